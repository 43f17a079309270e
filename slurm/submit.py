"""Build the submitit executor from ClusterOptions, render the sbatch script without submitting,
submit, and wait with failures reported from the tasks' own stderr.

A stage is submitted as steps (`slurm.jobs.Step`): each step is one job or one array job, and a step
may wait for earlier ones through a SLURM dependency. `submit_steps` returns a `Submission` that
describes every job (ids, logs, how to cancel) and waits for all of them."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from submitit.slurm.slurm import SlurmExecutor

from slurm.jobs import Step
from slurm.options import ClusterOptions, executor_kwargs, merge


class JobFailed(RuntimeError):
    """A job ended without a result; the message carries the failing tasks' stderr tails.
    `results` holds what the steps that did finish returned (Submission.wait)."""

    def __init__(self, message: str, results: dict[str, list[list[Any]]] | None = None) -> None:
        super().__init__(message)
        self.results = results or {}


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
    return {
        "executor": ctor,
        "parameters": params,
        "slurm_parameters": dict(slurm_ex.parameters),
        "sbatch_script": script,
    }


def format_render(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            "# submitit.AutoExecutor(cluster='slurm', "
            + ", ".join(f"{k}={v!r}" for k, v in r["executor"].items())
            + ")",
            "# executor.update_parameters(**" + json.dumps(r["parameters"], indent=1, sort_keys=True) + ")",
            "# sbatch script:",
            r["sbatch_script"],
        ]
    )


def submit(executor: submitit.AutoExecutor, functions: Sequence[Callable[[], Any]]) -> list[submitit.Job]:
    """One function: one job; several: one array job (capped by array_parallelism)."""
    if len(functions) == 1:
        return [executor.submit(functions[0])]
    with executor.batch():
        jobs = [executor.submit(f) for f in functions]
    return jobs


def describe(job: submitit.Job) -> str:
    tasks = f", {job.num_tasks} tasks" if job.num_tasks > 1 else ""
    return (
        f"job {job.job_id}{tasks}\n  logs: {job.paths.stdout}\n        {job.paths.stderr}"
        + ("\n  (one .out/.err per task: %t is the task number)" if job.num_tasks > 1 else "")
        + f"\n  cancel: scancel {job.job_id}"
    )


def _tail(path: Path, lines: int) -> str:
    if not path.exists():
        return f"(no file {path})"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def _task_failed(task: submitit.Job) -> bool:
    """Whether a finished task left no result or an error, without submitit's wait for a result file."""
    path = task.paths.result_pickle
    if not path.exists():
        return True
    try:
        outcome, _ = submitit.core.utils.pickle_load(path)
    except Exception:
        return True
    return outcome == "error"


def failure_report(job: submitit.Job, lines: int = 40) -> str:
    """The end of each failing task's stderr, which holds the traceback the job raised."""
    tasks = [job.task(i) for i in range(job.num_tasks)] if job.num_tasks > 1 else [job]
    failed = [t for t in tasks if _task_failed(t)] or tasks
    tails = {t.task_id: _tail(t.paths.stderr, lines) for t in failed}
    headline = next((h for h in map(_headline, tails.values()) if h), None)
    # sacct lags: a task whose result says "error" can still read RUNNING for a few seconds
    state = job.state
    shown = "" if state in ("RUNNING", "PENDING", "UNKNOWN", "COMPLETING") else f" (state {state})"
    parts = [f"job {job.job_id} failed{shown}" + (f": {headline}" if headline else "")]
    for t in failed:
        parts += [f"--- task {t.task_id}: last {lines} lines of {t.paths.stderr}", tails[t.task_id]]
    return "\n".join(parts)


def _headline(stderr_tail: str) -> str | None:
    """The error itself: the last unindented line that is not srun's or submitit's own
    (for a Python failure, the exception line under the traceback)."""
    for line in reversed(stderr_tail.splitlines()):
        if line.strip() and not line[0].isspace() and not line.startswith(("srun:", "submitit ", "(no file")):
            return line.strip()[:300]
    return None


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


# ---- several steps with dependencies ----------------------------------------------------------------


def step_name(stage: str, opts: ClusterOptions, step: Step, several: bool) -> str:
    base = opts.job_name or stage
    return f"{base}-{step.name}" if several else base


def step_options(opts: ClusterOptions, stage: str, step: Step, dependency: str | None) -> ClusterOptions:
    """The cluster options of one step: the stage's, the step's overrides, and its dependency."""
    step_opts = merge(opts, step.options, f"stage {stage}, step {step.name}") if step.options else opts
    if dependency is not None:
        sbatch = {**step_opts.sbatch_args, "dependency": dependency}
        if step.condition == "afterok":
            sbatch["kill-on-invalid-dep"] = "yes"  # a failed dependency cancels the job instead of leaving it pending
        step_opts = merge(step_opts, {"sbatch_args": sbatch}, f"stage {stage}, step {step.name}")
    return step_opts


def _dependency(step: Step, job_ids: dict[str, str]) -> str | None:
    if not step.after:
        return None
    return step.condition + ":" + ":".join(job_ids[name] for name in step.after)


def render_steps(opts: ClusterOptions, stage: str, steps: Sequence[Step]) -> str:
    """The dry run of a stage: every step's submitit arguments and sbatch script. Job ids that do not
    exist yet appear as JOBID_OF_<STEP>."""
    several = len(steps) > 1
    placeholders = {s.name: f"JOBID_OF_{step_name(stage, opts, s, several).upper().replace('-', '_')}" for s in steps}
    parts = []
    for number, step in enumerate(steps, start=1):
        step_opts = step_options(opts, stage, step, _dependency(step, placeholders))
        name = step_name(stage, opts, step, several)
        if several:
            what = f"array job of {len(step.functions)} tasks" if len(step.functions) > 1 else "job"
            after = f", {step.condition} {', '.join(step.after)}" if step.after else ""
            parts.append(f"# ==== step {number}/{len(steps)}: {step.name} ({what}{after}) ====")
        parts.append(format_render(render(step_opts, name, array_size=len(step.functions))))
    return "\n".join(parts)


@dataclass
class SubmittedStep:
    step: Step
    name: str  # the SLURM job name
    jobs: list[submitit.Job]

    @property
    def job_id(self) -> str:
        """The SLURM job id: for an array, the array's own id (what dependencies and scancel take)."""
        return self.jobs[0].job_id.split("_")[0] if len(self.jobs) > 1 else self.jobs[0].job_id

    def describe(self) -> str:
        first = self.jobs[0]
        if len(self.jobs) == 1:
            what = f"job {self.job_id}" + (f", {first.num_tasks} tasks" if first.num_tasks > 1 else "")
            out, err = str(first.paths.stdout), str(first.paths.stderr)
        else:
            what = f"array job {self.job_id}, {len(self.jobs)} tasks"
            out, err = (
                str(p).replace(f"{self.job_id}_0", f"{self.job_id}_<i>")
                for p in (first.paths.stdout, first.paths.stderr)
            )
        after = f" ({self.step.condition} {', '.join(self.step.after)})" if self.step.after else ""
        lines = [f"  {self.step.name}: {what}{after}", f"    logs: {out}", f"          {err}"]
        if len(self.jobs) > 1:
            lines.append(f"          (<i> = array task 0..{len(self.jobs) - 1})")
        if first.num_tasks > 1:
            lines.append("          (one .out/.err per rank: the number before _log is the rank)")
        return "\n".join(lines)


class Submission:
    """The jobs of one stage submission, in step order."""

    def __init__(self, stage: str, steps: list[SubmittedStep]) -> None:
        self.stage, self.steps = stage, steps

    def __getitem__(self, name: str) -> SubmittedStep:
        return next(s for s in self.steps if s.step.name == name)

    @property
    def job_ids(self) -> list[str]:
        return [s.job_id for s in self.steps]

    def describe(self) -> str:
        if len(self.steps) == 1 and len(self.steps[0].jobs) == 1:  # one plain job: the historical format
            return describe(self.steps[0].jobs[0])
        lines = [f"{len(self.steps)} job(s)"] + [s.describe() for s in self.steps]
        lines.append(f"  cancel all: scancel {' '.join(self.job_ids)}")
        return "\n".join(lines)

    def cancel(self) -> None:
        subprocess.run(["scancel", *self.job_ids], check=False, timeout=30, capture_output=True)

    def wait(
        self,
        timeout_s: float | None = None,
        poll_s: float = 0.5,
        on_step: Callable[[SubmittedStep, list[list[Any]]], None] | None = None,
    ) -> dict[str, list[list[Any]]]:
        """Wait for every step, in order. Returns {step name: [each job's task results]}.

        A failed step's jobs are reported with their stderr tails (at most `MAX_REPORTED` failing array
        tasks in full); steps that waited for it with `afterok` are cancelled and named. All of it
        comes as one JobFailed at the end, after every step that could run has run. TimeoutError when
        the deadline passes (the jobs keep running; the message says how to cancel them)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        results: dict[str, list[list[Any]]] = {}
        failures: list[str] = []
        failed: set[str] = set()
        for ss in self.steps:
            blocked = [a for a in ss.step.after if a in failed] if ss.step.condition == "afterok" else []
            if blocked:
                subprocess.run(["scancel", ss.job_id], check=False, timeout=30, capture_output=True)
                failures.append(
                    f"{self.stage} {ss.step.name} (job {ss.job_id}): not run, because {', '.join(blocked)} failed"
                )
                failed.add(ss.step.name)
                continue
            step_results, bad = [], []
            for job in ss.jobs:
                while not job.done():
                    if deadline is not None and time.monotonic() > deadline:
                        raise TimeoutError(
                            f"{self.stage} {ss.step.name}: job {job.job_id} still {job.state} after {timeout_s:.0f}s "
                            f"(the jobs keep running; cancel them with: scancel {' '.join(self.job_ids)})"
                        )
                    time.sleep(poll_s)
                try:
                    step_results.append(job.results())
                except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError):
                    bad.append(job)
            if bad:
                failed.add(ss.step.name)
                head = f"{self.stage} {ss.step.name}: "
                head += (
                    f"{len(bad)} of {len(ss.jobs)} array tasks failed ({', '.join(j.job_id for j in bad)})"
                    if len(ss.jobs) > 1
                    else f"job {ss.job_id} failed"
                )
                parts = [head] + [failure_report(job) for job in bad[:MAX_REPORTED]]
                if len(bad) > MAX_REPORTED:
                    parts.append(f"... and {len(bad) - MAX_REPORTED} more failed tasks (their logs: see above)")
                failures.append("\n".join(parts))
                continue
            results[ss.step.name] = step_results
            if on_step is not None:
                on_step(ss, step_results)
        if failures:
            raise JobFailed("\n\n".join(failures), results=results)
        return results


MAX_REPORTED = 3  # failing array tasks whose stderr is shown in full


def submit_steps(opts: ClusterOptions, stage: str, steps: Sequence[Step]) -> Submission:
    """Submit every step, each after the steps it waits for. If a submission fails, the jobs already
    submitted are cancelled (an array whose merge job never got submitted would be orphaned)."""
    several = len(steps) > 1
    job_ids: dict[str, str] = {}
    done: list[SubmittedStep] = []
    try:
        for step in steps:
            step_opts = step_options(opts, stage, step, _dependency(step, job_ids))
            name = step_name(stage, opts, step, several)
            jobs = submit(make_executor(step_opts, name), step.functions)
            done.append(SubmittedStep(step, name, jobs))
            job_ids[step.name] = done[-1].job_id
    except BaseException:
        if done:
            Submission(stage, done).cancel()
        raise
    return Submission(stage, done)
