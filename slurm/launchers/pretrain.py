"""`python -m slurm pretrain [cluster options] -- <pretrain arguments>`

One job of nodes x tasks-per-node tasks; every task is one rank running `pretrain.main.run_from_argv`,
the code `deepspeed pretrain/main.py` runs, with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and
MASTER_PORT taken from submitit's JobEnvironment (`export_torch_env`). The arguments always carry
`--resume auto`: the first run starts fresh (or continues a run already in output_dir), and after the
pre-limit signal (SIGUSR2) every rank checkpoints, submitit requeues the job, and the requeued job
continues from that checkpoint. A preemption that SLURM requeues by itself resumes the same way.
A stalled rank (pretrain.watchdog: no progress for train.stall_timeout_s, exit code 75) requeues the job
too, with `scontrol requeue` from the rank that reports it; the requeued job resumes the same way.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from slurm.jobs import RequeueableJob, StageError, Step
from slurm.options import ClusterOptions


class PretrainJob(RequeueableJob):
    """Runs on every task of the job, after export_torch_env()."""

    def __init__(self, argv: list[str], cpu: bool) -> None:
        self.argv, self.cpu = list(argv), cpu

    def run(self) -> Any:
        if self.cpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no GPU in the job: DeepSpeed's CPU accelerator (gloo)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        if os.environ.get("RANK", "0") == "0":
            print(
                f"slurm pretrain: attempt {self.attempt}, {os.environ.get('WORLD_SIZE')} ranks, "
                f"master {os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}, "
                f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}: pretrain {' '.join(self.argv)}",
                flush=True,
            )
        from pretrain.main import run_from_argv
        from pretrain.watchdog import STALL_HOOKS

        STALL_HOOKS[:] = [requeue_stalled_job]
        return run_from_argv(self.argv)

    def finished(self, outcome: Any) -> bool:
        # RunOutcome.stopped: a signal stopped the training after a complete checkpoint -> requeue
        return not getattr(outcome, "stopped", False)


def requeue_stalled_job(line: str) -> None:
    """A rank stalled (pretrain.watchdog, exit code 75): put the job back in the queue, where it resumes from
    its newest complete checkpoint (--resume auto), instead of failing it. Run by the one reporting rank."""
    import subprocess

    import submitit

    job_id = submitit.JobEnvironment().job_id
    print(f"slurm pretrain: requeueing job {job_id} after the stall", file=sys.stderr, flush=True)
    subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)


def job_argv(stage_args: list[str]) -> list[str]:
    """The stage arguments with `--resume auto` (what every attempt of the job must run)."""
    argv, resume, i = [], None, 0
    while i < len(stage_args):
        arg = stage_args[i]
        if arg in ("--resume",) and i + 1 < len(stage_args):
            resume, i = stage_args[i + 1], i + 2
            continue
        if arg.startswith("--resume="):
            resume, i = arg.split("=", 1)[1], i + 1
            continue
        if arg == "--print-config":
            raise StageError(
                "--print-config prints and exits; run `python -m pretrain.main ... --print-config` without SLURM"
            )
        if arg.startswith(("--local_rank", "--local-rank")):  # the deepspeed launcher's; RANK env is what counts
            i += 1 if "=" in arg else 2
            continue
        argv.append(arg)
        i += 1
    if resume not in (None, "auto"):
        raise StageError(
            f"--resume {resume}: under SLURM every attempt runs with --resume auto (a requeued job must "
            "continue from the run's newest checkpoint); to restart from an older checkpoint, delete the "
            "newer ones, or start a new run in another output_dir"
        )
    return argv + ["--resume", "auto"]


def build(stage_args: list[str], options: ClusterOptions, dry_run: bool) -> list[Step]:
    if not stage_args:
        raise StageError("no pretrain arguments: give them after `--`, e.g. -- --config base --set data.path=...")
    argv = job_argv(stage_args)
    world_size = options.nodes * options.ntasks_per_node
    # Check the config, the data and the batch split for this world size now, not after hours in the queue.
    from pretrain.config import ConfigError, load_config, resolve
    from pretrain.main import parse_args

    args = parse_args(argv)  # argparse prints its own error and exits 2
    try:
        config = load_config(args.config, args.overrides)
        resolved = resolve(config, world_size)
    except ConfigError as err:
        raise StageError(
            f"{err} (checked for {world_size} ranks = {options.nodes} nodes x {options.ntasks_per_node} tasks per node)"
        ) from None
    print(
        f"python -m slurm pretrain: {world_size} ranks ({options.nodes} nodes x {options.ntasks_per_node} tasks), "
        f"{resolved.total_steps} steps, grad accumulation {resolved.grad_accum}, run folder {config.run_dir}, "
        f"checkpoints {config.checkpoint_dir}",
        file=sys.stderr,
    )
    job = PretrainJob(argv, cpu=options.gpus_per_node == 0)

    def summary(results: list[list[Any]]) -> str:
        outcome = results[0][0]  # rank 0
        return f"{outcome.status} {outcome.step}/{outcome.total_steps} steps; checkpoint {outcome.checkpoint}"

    return [Step("pretrain", [job], summary=summary)]
