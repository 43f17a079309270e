"""Masked-LM pretraining entry point: one code path for every launcher.

    deepspeed pretrain/main.py --config base --set data.path=/data/shards            # one node
    deepspeed --hostfile hosts pretrain/main.py --config base --set data.path=...     # several nodes
    torchrun --standalone --nproc_per_node 8 pretrain/main.py --config base ...
    python -m pretrain.main --config tiny --set data.path=... --resume auto         # one process
    DS_ACCELERATOR=cpu ...                                                           # no GPU: gloo on CPU

In code (the SLURM launcher, after exporting RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT):
`main(argv) -> int`, or `run_from_argv(argv) -> RunOutcome` to see whether the run completed or
stopped on a signal.

Return codes: 0 completed, or stopped by SIGTERM/SIGUSR1 after a complete checkpoint (then
run_status.json says "stopped" and `--resume auto` continues); 2 a config mistake (nothing ran);
3 diverged (too many non-finite losses in a row), 2 also for a corrupt shard found while training; 75 stalled (a rank made no progress for
train.stall_timeout_s; requeue-able, see pretrain/watchdog.py); 5 more faults in a row (of any kind) without a new
checkpoint than train.max_requeues_without_progress, found by a stall or at an automatic restart (not requeue-able); 4 a checkpoint could not be saved (one
line; the previous checkpoint is intact; free the space and rerun with --resume auto); anything else is a crash (traceback).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (`deepspeed pretrain/main.py`): Python put pretrain/ first on sys.path, where our
    # module names (config, data, metrics...) would shadow other packages'. Use the project root instead.
    _here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(_here)]
    sys.path.insert(0, str(Path(_here).parent))

import argparse
import os
import time
from collections.abc import Sequence

from common.net import free_port

EXIT_OK, EXIT_CONFIG, EXIT_DIVERGED, EXIT_SAVE_FAILED = 0, 2, 3, 4
STALE_LOCK_S = 15 * 60  # a DeepSpeed op compiles in ~1-2 min; a lock this old was left by a killed compile
# torchrun and the deepspeed launcher tear every rank down when the first one exits. A config mistake is
# found on every rank, and rank 0 reports it; the other ranks wait this long before exiting, so that a
# slower rank 0 is not killed before it has printed. They report it themselves if still alive by then.
REPORT_GRACE_S = 30.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="pretrain",
        description="Masked-LM pretraining of HyperMixer encoders under DeepSpeed ZeRO on data_pipeline shards.",
    )
    parser.add_argument(
        "--config",
        required=True,
        help="a shipped config (tiny, small, base; .json optional) or a path to a JSON config",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="extend",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="override a field, e.g. --set data.path=/data optim.lr=1e-4 "
        "deepspeed.zero_optimization.stage=3 (values parse as JSON, else as strings)",
    )
    parser.add_argument(
        "--resume",
        default="none",
        help="auto: continue from the newest complete checkpoint (start fresh if none); "
        "none (default): start fresh, refusing to overwrite checkpoints; or a checkpoint path",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the validated config and the derived DeepSpeed config, then exit",
    )
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the deepspeed launcher; LOCAL_RANK is what we use
    return parser.parse_args(argv)


def prepare_environment() -> None:
    """Single process without a launcher: a one-rank env:// group (else DeepSpeed tries MPI discovery).
    On CPU without OMP_NUM_THREADS: share the cores between the node's ranks (oversubscription is slow)."""
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
            raise SystemExit(
                "pretrain: SLURM started several tasks but no launcher set RANK/WORLD_SIZE; use "
                "`python -m slurm`, torchrun or deepspeed, or export the torch distributed variables"
            )
        os.environ.update(
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(free_port()),
        )
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if "OMP_NUM_THREADS" not in os.environ and not torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))


def clear_stale_extension_locks() -> None:
    """A compile killed half-way leaves a `lock` that makes every later run wait forever, silently."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root or os.environ.get("LOCAL_RANK", "0") != "0" or not Path(root).is_dir():
        return
    for lock in Path(root).glob("**/lock"):
        try:
            if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
                lock.unlink()
                print(f"pretrain: removed a stale compile lock {lock}", file=sys.stderr, flush=True)
        except FileNotFoundError:
            pass


def quiet_deepspeed() -> None:
    import logging

    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)


def run_from_argv(argv: Sequence[str] | None = None, build_model=None, after_step=()):
    """Parse, validate, train. Returns the trainer's RunOutcome; raises ConfigError / NonFiniteLossError.
    build_model, after_step: see pretrain.trainer.Trainer (build_model None: the library's ForMaskedLM)."""
    from pretrain.config import load_config, resolve
    from pretrain.trainer import run

    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    prepare_environment()
    if args.print_config:
        import json

        resolved = resolve(config, int(os.environ.get("WORLD_SIZE", "1")))
        print(
            json.dumps(
                {
                    "config": config.to_dict(),
                    "model": resolved.model.to_dict(),
                    "grad_accum": resolved.grad_accum,
                    "total_steps": resolved.total_steps,
                    "deepspeed": resolved.deepspeed,
                },
                indent=1,
            )
        )
        return None
    clear_stale_extension_locks()
    quiet_deepspeed()
    return run(config, args.resume, after_step=after_step, **({"build_model": build_model} if build_model else {}))


def one_line(err: Exception) -> str:
    """The error's own line, also when a DataLoader worker's error came wrapped in its traceback."""
    lines = str(err).strip().splitlines()
    if len(lines) > 1 and "DataLoader worker" in lines[0]:
        return lines[-1].split(": ", 1)[1] if ": " in lines[-1] else lines[-1]
    return str(err)


def report_failure(err: Exception, everywhere: bool = True) -> None:
    """One message per job: rank 0 prints at once; another rank only if rank 0 has not ended the job first.
    A failure found on one rank only (`everywhere` False: a corrupt shard) is printed at once by that rank."""
    rank = os.environ.get("RANK", "0")
    if everywhere and rank != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(REPORT_GRACE_S)  # normally the launcher kills us here, after rank 0 has printed and exited
        print(f"pretrain (rank {rank}): {err}", file=sys.stderr, flush=True)
        return
    print(f"pretrain: {err}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None, build_model=None, after_step=()) -> int:
    from data_pipeline.errors import DataPipelineError
    from pretrain.checkpoint import CheckpointSaveError
    from pretrain.config import ConfigError
    from pretrain.run_status import NoProgressError
    from pretrain.trainer import NonFiniteLossError
    from pretrain.watchdog import EXIT_STALLED_AGAIN

    try:
        run_from_argv(argv, build_model, after_step)
    except ConfigError as err:
        report_failure(err)
        return EXIT_CONFIG
    except NonFiniteLossError as err:
        report_failure(err)
        return EXIT_DIVERGED
    except DataPipelineError as err:  # a corrupt shard found while training: one line, not a traceback
        report_failure(one_line(err), everywhere=False)
        return EXIT_CONFIG
    except NoProgressError as err:  # an automatic restart after too many faults in a row: not requeue-able
        report_failure(err)
        return EXIT_STALLED_AGAIN
    except CheckpointSaveError:  # rank 0 printed the summary line; run_status.json says failed (if writable)
        return EXIT_SAVE_FAILED
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # clean exit for in-process callers; after an error the process just ends
    return EXIT_OK


if __name__ == "__main__":
    code = main()
    if code != EXIT_OK:
        # After an error, native threads of the process group can still be running: interpreter teardown may
        # then abort (std::terminate, exit -6) and hide the exit code the launcher must see. The trainer has
        # already closed its files and wandb, so end here.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
