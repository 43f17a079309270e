"""What runs inside a SLURM job, and the registry of stages `python -m slurm` can launch.

Stage launchers subclass `RequeueableJob` and implement `run()`. How a job survives its time limit
or a preemption (details and reasons in docs/slurm.md):

1. SLURM sends `--signal=USR2@<lead>` to every task before the limit (submitit writes that line).
2. Our USR2 handler forwards it, on every rank, to the stage's own SIGTERM handler; the training
   loop then checkpoints at its next step boundary and stops: it raises SystemExit, or returns a
   result that the launcher's `finished(result)` calls unfinished (pretrain's RunOutcome.stopped).
3. Once the stage has stopped, rank 0 hands over to submitit's handler, which calls `checkpoint()`
   (resubmit this object), pickles it and runs `scontrol requeue`; the requeued job resumes.
   A stage without a SIGTERM handler gets submitit's classic behaviour: step 3 at once.
"""
from __future__ import annotations

import os
import signal
import sys
import types
from dataclasses import dataclass, field
from typing import Any, Callable

import submitit
from submitit.core.job_environment import JobEnvironment, SignalHandler

from slurm.options import ClusterOptions

TORCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _log(msg: str) -> None:
    print(f"slurm.jobs: {msg}", file=sys.stderr, flush=True)


def export_torch_env() -> dict[str, str]:
    """Inside a task of a submitit job: export RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
    MASTER_ADDR (first node of the job) and MASTER_PORT (derived from the job id), so that
    `torch.distributed` / DeepSpeed initialise with env:// exactly as under torchrun."""
    # overwrite: sbatch copies the submitting shell's environment, which may hold a stale RANK.
    # CUDA_VISIBLE_DEVICES is left alone: every task sees the node's GPUs and picks cuda:LOCAL_RANK,
    # which is what DeepSpeed does with LOCAL_RANK (narrowing it to one GPU would break that).
    submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    # torchrun sets 1; without it each rank starts a thread per core and ranks fight over cores.
    os.environ.setdefault("OMP_NUM_THREADS", os.environ.get("SLURM_CPUS_PER_TASK", "1"))
    return {k: os.environ[k] for k in TORCH_ENV}


def _in_submitit_job() -> bool:
    return bool(os.environ.get("SUBMITIT_EXECUTOR")) and bool(os.environ.get("SUBMITIT_FOLDER"))


def _is_stage_handler(handler: Any) -> bool:
    """A Python handler installed by the stage (not submitit's, not a default)."""
    return callable(handler) and not isinstance(getattr(handler, "__self__", None), (SignalHandler, _StopSignal))


class _StopSignal:
    """While the stage runs, owns submitit's pre-limit signal and defers submitit's requeue until
    the stage has stopped cleanly."""

    def __init__(self) -> None:
        self.signum = JobEnvironment._usr_sig()  # what `--signal` sends (submitit's USR_SIG)
        self.submitit_handler: Any = None
        self.received: int | None = None
        self.handed_over = False  # submitit's handler already ran (it requeues and exits itself)

    def __enter__(self) -> "_StopSignal":
        # In a submitit job this is SignalHandler.checkpoint_and_try_requeue, bound by process_job.
        self.submitit_handler = signal.getsignal(self.signum)
        signal.signal(self.signum, self._on_signal)
        return self

    def __exit__(self, *exc: Any) -> None:
        # The work is over: a late signal must not requeue a finished job.
        signal.signal(self.signum, self._ignore)

    def _ignore(self, signum: int, frame: types.FrameType | None) -> None:
        _log(f"ignoring {signal.Signals(signum).name}: the job's work is already over")

    def _on_signal(self, signum: int, frame: types.FrameType | None) -> None:
        self.received = signum
        stage_handler = signal.getsignal(signal.SIGTERM)
        if _is_stage_handler(stage_handler):
            _log(f"{signal.Signals(signum).name}: asking the stage to checkpoint and stop (as SIGTERM)")
            stage_handler(signal.SIGTERM, frame)
        elif callable(self.submitit_handler) and not self.handed_over:
            # no graceful stop in the stage: submitit's own behaviour, checkpoint() and requeue now
            self.handed_over = True
            self.submitit_handler(signum, frame)

    def requeue(self) -> None:
        """After the stage stopped: rank 0 lets submitit checkpoint, requeue and exit; the other
        ranks leave without a result (the requeued job writes it)."""
        if callable(self.submitit_handler):
            self.submitit_handler(self.received, None)  # rank 0 does not come back from this
        raise SystemExit(0)


class RequeueableJob(submitit.helpers.Checkpointable):
    """Base class of stage jobs. Subclasses implement `run()`, which runs on every task.

    - the torch distributed env is exported first (`export_distributed_env = False` to skip);
    - after the pre-limit signal, `run()` raising SystemExit, or returning a result for which
      `finished(result)` is False, means "checkpointed, requeue me"; otherwise returning means done;
    - an unfinished result is never written as the job's result (a requeued job would look done);
    - `attempt` counts the runs of this job (1, then 2 after the first requeue, ...).
    """

    export_distributed_env = True
    attempt = 0

    def __call__(self) -> Any:
        self.attempt += 1
        if self.export_distributed_env and _in_submitit_job():
            export_torch_env()
        with _StopSignal() as stop:
            try:
                result = self.run()
                unfinished = not self.finished(result)
            except SystemExit:
                if stop.received is None or stop.handed_over:
                    raise
                unfinished = True
        if unfinished and stop.received is not None:
            stop.requeue()  # does not return
        if unfinished:
            # Stopped by SIGTERM/SIGUSR1 alone: scancel, or a preemption that SLURM may requeue by
            # itself. Writing this partial result would make a requeued job look done, so write none.
            _log("the stage stopped before finishing, without the pre-limit signal: no result written")
            raise SystemExit(1)
        return result

    def run(self) -> Any:
        raise NotImplementedError

    def finished(self, result: Any) -> bool:
        return True

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on rank 0 before it requeues: resubmit this object as it is now
        (attempt count and any state kept on it), so the next run resumes."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


# ---- stages -------------------------------------------------------------------------------------

# build(stage_args, options) -> the callables to submit: one is a job, several an array.
Builder = Callable[[list[str], ClusterOptions], list[Callable[[], Any]]]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    direct: str  # how to run the stage without SLURM (shown while no launcher exists)
    build: Builder | None = None  # None: the SLURM launcher is not written yet
    defaults: dict[str, Any] = field(default_factory=dict)  # cluster option defaults for this stage


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


register(Stage("preprocess", "tokenize raw text into webdataset shards", "python -m data_pipeline ..."))
register(Stage("pretrain", "pretrain a HyperMixer encoder with DeepSpeed", "python -m pretrain.main ..."))
register(Stage("finetune", "fine-tune a release on GLUE", "python -m finetune ..."))
