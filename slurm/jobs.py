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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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

    def __enter__(self) -> _StopSignal:
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


class StageError(ValueError):
    """A mistake in the stage arguments (or what they point at); its message is one line for the user.
    Nothing has been submitted when a builder raises it."""


def use_task_cpus() -> None:
    """In a one-process job (a preprocessing unit, a fine-tuning run): let the thread pools use the CPUs
    SLURM gave the task (`--cpus-per-task`), unless the environment already says otherwise."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if not cpus:
        return
    os.environ.setdefault("OMP_NUM_THREADS", cpus)
    os.environ.setdefault("RAYON_NUM_THREADS", cpus)  # the tokenizers' thread pool
    if cpus == "1":
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if "torch" in sys.modules:  # already imported: OMP_NUM_THREADS came too late for it
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@dataclass
class Step:
    """One submission of a stage: one callable is a job, several are one array job.

    `after` names earlier steps this one waits for (`--dependency=<condition>:<their job ids>`; for an
    array, its job id stands for all its tasks). With `afterok` a failed dependency cancels this job
    (`--kill-on-invalid-dep=yes`); `afterany` runs it whatever happened (e.g. aggregate what finished).
    `options` are cluster-option overrides for this step (a merge job needs one task and no GPU).
    `summary(results)` turns the step's results (one list of task results per job) into a line for the
    user once the step has finished (`--wait`)."""

    name: str
    functions: list[Callable[[], Any]]
    after: tuple[str, ...] = ()
    condition: str = "afterok"
    options: dict[str, Any] = field(default_factory=dict)
    summary: Callable[[list[list[Any]]], str] | None = None

    def __post_init__(self) -> None:
        if not self.functions:
            raise ValueError(f"step {self.name!r} has nothing to run")
        if self.condition not in ("afterok", "afterany"):
            raise ValueError(f"step {self.name!r}: condition must be afterok or afterany, got {self.condition!r}")
        self.after = tuple(self.after)


# build(stage_args, options, dry_run) -> the steps to submit, in an order where every step comes after
# the steps it waits for; or, for a one-step stage, just its callables (one is a job, several an array).
# A builder validates the stage arguments (StageError) and has no side effects when dry_run is True.
Builder = Callable[[list[str], ClusterOptions, bool], "list[Step] | list[Callable[[], Any]]"]


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    direct: str  # how to run the stage without SLURM
    build: Builder | None = None  # None: the SLURM launcher is not written yet
    defaults: dict[str, Any] = field(default_factory=dict)  # cluster option defaults for this stage

    def steps(self, stage_args: list[str], options: ClusterOptions, dry_run: bool = False) -> list[Step]:
        if self.build is None:
            raise StageError(f"the SLURM launcher for stage '{self.name}' is not written yet")
        built = list(self.build(list(stage_args), options, dry_run))
        if built and all(isinstance(s, Step) for s in built):
            steps = built
        else:
            steps = [Step(self.name, built)]
        seen: set[str] = set()
        for s in steps:
            unknown = [a for a in s.after if a not in seen]
            if unknown:
                raise ValueError(f"stage {self.name}: step {s.name!r} waits for {unknown}, which do not come before it")
            seen.add(s.name)
        return steps


STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    STAGES[stage.name] = stage
    return stage


def _lazy(module: str) -> Builder:
    """A builder imported on first use: `python -m slurm --help` must not import torch or deepspeed."""

    def build(stage_args: list[str], options: ClusterOptions, dry_run: bool) -> Any:
        import importlib

        return importlib.import_module(module).build(stage_args, options, dry_run)

    build.__qualname__ = f"{module}.build"
    return build


register(
    Stage(
        "preprocess",
        "tokenize raw text into webdataset shards: a planning job, an array of work units, a merge job",
        "python -m data_pipeline build ...",
        build=_lazy("slurm.launchers.preprocess"),
    )
)
register(
    Stage(
        "pretrain",
        "pretrain a HyperMixer encoder with DeepSpeed: nodes x tasks-per-node ranks, "
        "requeued and resumed on preemption",
        "deepspeed pretrain/main.py ... (or python -m pretrain.main)",
        build=_lazy("slurm.launchers.pretrain"),
        defaults={"signal_lead_s": 300},
    )
)
register(
    Stage(
        "finetune",
        "fine-tune a release on GLUE: a sweep as an array job, then an aggregation job",
        "python -m finetune sweep ...",
        build=_lazy("slurm.launchers.finetune"),
    )
)
