"""Build the submitit executor from ClusterOptions, render the sbatch script without submitting,
submit, and wait with failures reported from the tasks' own stderr."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import submitit
from submitit.slurm.slurm import SlurmExecutor

from slurm.options import ClusterOptions, executor_kwargs


class JobFailed(RuntimeError):
    """A job ended without a result; the message carries the failing tasks' stderr tails."""


def make_executor(opts: ClusterOptions, stage: str) -> submitit.AutoExecutor:
    # cluster="slurm": never fall back to running locally because srun happens to be missing
    ctor, params = executor_kwargs(opts, stage)
    executor = submitit.AutoExecutor(cluster="slurm", **ctor)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _without_srun() -> Iterator[None]:
    """SlurmExecutor refuses to exist where `srun` is missing; rendering a script does not need it."""
    if shutil.which("srun"):
        yield
        return
    original = SlurmExecutor.__dict__["affinity"]
    SlurmExecutor.affinity = classmethod(lambda cls: 2)  # type: ignore[method-assign]
    try:
        yield
    finally:
        SlurmExecutor.affinity = original  # type: ignore[method-assign]


def render(opts: ClusterOptions, stage: str, array_size: int | None = None) -> dict[str, Any]:
    """What a submission would send, without sending it: the AutoExecutor arguments, the resulting
    SLURM parameters and the sbatch script (built by submitit's own SlurmExecutor)."""
    ctor, params = executor_kwargs(opts, stage)
    with _without_srun():
        executor = make_executor(opts, stage)
    slurm_ex = executor._executor  # the SlurmExecutor behind AutoExecutor
    if array_size and array_size > 1:
        slurm_ex.parameters["map_count"] = array_size  # what submitit sets for arrays
    script = slurm_ex._make_submission_file_text(slurm_ex._submitit_command_str, "dry-run")
    return {"executor": ctor, "parameters": params, "slurm_parameters": dict(slurm_ex.parameters),
            "sbatch_script": script}


def format_render(r: dict[str, Any]) -> str:
    return "\n".join([
        "# submitit.AutoExecutor(cluster='slurm', " + ", ".join(f"{k}={v!r}" for k, v in r["executor"].items()) + ")",
        "# executor.update_parameters(**" + json.dumps(r["parameters"], indent=1, sort_keys=True) + ")",
        "# sbatch script:",
        r["sbatch_script"],
    ])


def submit(executor: submitit.AutoExecutor, functions: Sequence[Callable[[], Any]]) -> list[submitit.Job]:
    """One function: one job; several: one array job (capped by array_parallelism)."""
    if len(functions) == 1:
        return [executor.submit(functions[0])]
    with executor.batch():
        jobs = [executor.submit(f) for f in functions]
    return jobs


def describe(job: submitit.Job) -> str:
    tasks = f", {job.num_tasks} tasks" if job.num_tasks > 1 else ""
    return (f"job {job.job_id}{tasks}\n  logs: {job.paths.stdout}\n        {job.paths.stderr}"
            + ("\n  (one .out/.err per task: %t is the task number)" if job.num_tasks > 1 else "")
            + f"\n  cancel: scancel {job.job_id}")


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no file {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def failure_report(job: submitit.Job, lines: int = 40) -> str:
    """The end of each failing task's stderr, which holds the traceback the job raised."""
    tasks = [job.task(i) for i in range(job.num_tasks)]
    failed = [t for t in tasks if t.exception() is not None] or tasks
    parts = [f"job {job.job_id} failed (state {job.state})"]
    for t in failed:
        parts += [f"--- task {t.task_id}: last {lines} lines of {t.paths.stderr}", _tail(t.paths.stderr, lines)]
    return "\n".join(parts)


def wait(job: submitit.Job, timeout_s: float | None = None, poll_s: float = 0.5) -> list[Any]:
    """All tasks' results; JobFailed with the stderr tails when the job failed or vanished,
    TimeoutError when it is still running after timeout_s."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not job.done():
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"job {job.job_id} still {job.state} after {timeout_s:.0f}s")
        time.sleep(poll_s)
    try:
        return job.results()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError):
        raise JobFailed(failure_report(job)) from None
