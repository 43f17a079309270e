"""The slurm package against a real local SLURM cluster and real submitit (nothing mocked)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pytest
import submitit

from slurm import submit as sub
from slurm.__main__ import main
from slurm.jobs import STAGES, TORCH_ENV, RequeueableJob, Stage, export_torch_env
from slurm.options import ClusterOptions

# The outer timeout only guards against a hang; the waits below are bounded by WAIT_S each, and the
# first test also pays for starting the cluster (apt-get install on a fresh machine).
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(600)]
# The job processes cannot import this test module: ship its functions and classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

WAIT_S = 90  # no single wait may hang CI


def executor(folder: Path, **overrides) -> submitit.AutoExecutor:
    return sub.make_executor(ClusterOptions(job_folder=str(folder / "%j"), time_min=15, **overrides), "test")


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


# ---- job bodies ------------------------------------------------------------------------------


def square(x: int) -> dict:
    return {"value": x * x, "host": os.uname().nodename}


def distributed_env() -> dict:
    env = submitit.JobEnvironment()
    exported = export_torch_env()
    return {
        "global_rank": env.global_rank,
        "local_rank": env.local_rank,
        "num_tasks": env.num_tasks,
        "exported": exported,
        "environ": {k: os.environ[k] for k in TORCH_ENV},
    }


def fail_loudly() -> None:
    print("about to fail", file=sys.stderr)
    raise ValueError("shard 17 is corrupt: checksum 0xdeadbeef")


class GracefulCounter(RequeueableJob):
    """Behaves like the training loop: on SIGTERM it saves its step at the next step boundary and
    then exits (SystemExit) or returns an unfinished result (as pretrain's run_from_argv does);
    on start it resumes from what it saved."""

    def __init__(self, folder: Path, steps: int, stop_by: str = "exit") -> None:
        self.folder, self.steps, self.stop_by = folder, steps, stop_by

    def finished(self, result: dict) -> bool:
        return not result.get("stopped")

    def run(self) -> dict:
        rank = int(os.environ["RANK"])
        state, progress = self.folder / f"state_{rank}", self.folder / f"progress_{rank}"
        stop = []
        signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
        done = start = int(state.read_text()) if state.exists() else 0
        while done < self.steps:
            if stop:
                state.write_text(str(done))  # "checkpoint"
                if self.stop_by == "exit":
                    sys.exit(0)
                return {"stopped": True}
            time.sleep(0.1)
            done += 1
            progress.write_text(str(done))
        return {"rank": rank, "done": done, "resumed_from": start, "attempt": self.attempt}


class InMemoryCounter(RequeueableJob):
    """No SIGTERM handler: submitit's classic path pickles this object (with its progress) at once."""

    def __init__(self, folder: Path, steps: int) -> None:
        self.folder, self.steps, self.done, self.resumed_from = folder, steps, 0, []

    def run(self) -> dict:
        self.resumed_from.append(self.done)
        while self.done < self.steps:
            time.sleep(0.1)
            self.done += 1
            (self.folder / "progress").write_text(str(self.done))
        return {"done": self.done, "resumed_from": self.resumed_from, "attempt": self.attempt}


# ---- tests -----------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def time_limited_job(slurm_cluster, tmp_path_factory):
    """A job that outlives its 2-minute limit, submitted before the first test so that its wait overlaps
    the others: SLURM itself sends `--signal=USR2@90` (5-30 s into each run here: SLURM checks limits
    every 30 s and may signal early), so it is requeued as timed out until its 35 s of work are done.
    Its stage returns an unfinished result when stopped, where the 2-task test's stage exits."""
    folder = tmp_path_factory.mktemp("time_limit")
    ex = sub.make_executor(
        ClusterOptions(job_folder=str(folder / "%j"), time_min=2, signal_lead_s=90, max_requeues=6), "test"
    )
    job = ex.submit(GracefulCounter(folder, steps=350, stop_by="return"))
    yield job
    if not job.done():  # e.g. its test was deselected
        job.cancel(check=False)


def test_single_task_job_returns_its_result(slurm_cluster, tmp_path):
    job = executor(tmp_path).submit(square, 7)
    (result,) = sub.wait(job, timeout_s=WAIT_S)
    assert result["value"] == 49


def test_two_tasks_see_their_ranks_and_the_torch_env(slurm_cluster, tmp_path):
    job = executor(tmp_path, tasks_per_node=2).submit(distributed_env)
    results = sub.wait(job, timeout_s=WAIT_S)
    assert [r["global_rank"] for r in results] == [0, 1]
    assert [r["local_rank"] for r in results] == [0, 1]
    for rank, r in enumerate(results):
        assert r["num_tasks"] == 2
        assert r["environ"] == r["exported"]
        assert r["environ"]["RANK"] == str(rank) and r["environ"]["LOCAL_RANK"] == str(rank)
        assert r["environ"]["WORLD_SIZE"] == "2" and r["environ"]["LOCAL_WORLD_SIZE"] == "2"
    # every rank must agree on the rendezvous point
    assert len({(r["environ"]["MASTER_ADDR"], r["environ"]["MASTER_PORT"]) for r in results}) == 1


def test_array_job(slurm_cluster, tmp_path):
    ex = executor(tmp_path, array_parallelism=3)
    jobs = sub.submit(ex, [lambda i=i: square(i) for i in range(5)])
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1, "expected one array job"
    assert [sub.wait(j, timeout_s=WAIT_S)[0]["value"] for j in jobs] == [0, 1, 4, 9, 16]


def test_failing_job_shows_its_stderr(slurm_cluster, tmp_path):
    # the helper every launcher's --wait goes through
    job = executor(tmp_path).submit(fail_loudly)
    with pytest.raises(sub.JobFailed) as err:
        sub.wait(job, timeout_s=WAIT_S)
    message = str(err.value)
    assert f"job {job.job_id} failed" in message
    assert str(job.paths.stderr) in message
    assert "about to fail" in message  # the task's own stderr, not only submitit's summary
    assert "ValueError: shard 17 is corrupt: checksum 0xdeadbeef" in message


def test_cli_submits_prints_job_and_logs_and_reports_failure(slurm_cluster, tmp_path, monkeypatch, capsys):
    # A stage registered by the test (the real ones have no launcher yet) through the real CLI path.
    monkeypatch.setitem(
        STAGES, "demo", Stage("demo", "test stage", "-", build=lambda args, opts, dry_run: [fail_loudly])
    )
    rc = main(
        [
            "demo",
            "--job-folder",
            str(tmp_path / "%j"),
            "--time-min",
            "15",
            "--wait",
            "--wait-timeout-s",
            str(WAIT_S),
            "--",
            "--anything",
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 1
    job_id = out.split("submitted demo: job ")[1].split()[0]
    assert f"{tmp_path}/{job_id}/{job_id}_0_log.err" in out and f"scancel {job_id}" in out
    assert "about to fail" in err and "ValueError: shard 17 is corrupt" in err


def _send_pre_limit_signal(job: submitit.Job) -> None:
    """What `--signal=USR2@lead` does before the time limit: USR2 to every task of the job step."""
    subprocess.run(["scancel", "--signal=USR2", job.job_id], check=True, timeout=10)


def test_signalled_jobs_are_requeued_and_resume(slurm_cluster, tmp_path):
    # All paths in one test so their requeue waits (~10 s, cred_expire) overlap.
    graceful_dir, classic_dir = tmp_path / "graceful", tmp_path / "classic"
    graceful_dir.mkdir()
    classic_dir.mkdir()
    graceful = executor(graceful_dir, tasks_per_node=2).submit(GracefulCounter(graceful_dir, steps=40))
    classic = executor(classic_dir).submit(InMemoryCounter(classic_dir, steps=40))
    term_dir = tmp_path / "term"
    term_dir.mkdir()
    term = executor(term_dir).submit(GracefulCounter(term_dir, steps=40, stop_by="return"))

    def progressed(path: Path) -> bool:
        return path.exists() and int(path.read_text() or 0) >= 5

    wait_until(
        lambda: progressed(graceful_dir / "progress_0") and progressed(graceful_dir / "progress_1"),
        WAIT_S,
        "the 2-task job to start",
    )
    _send_pre_limit_signal(graceful)
    wait_until(lambda: progressed(classic_dir / "progress"), WAIT_S, "the 1-task job to start")
    _send_pre_limit_signal(classic)
    # SIGTERM alone (scancel, or a preemption SLURM may requeue itself): stop, but neither requeue
    # nor leave the partial result behind
    wait_until(lambda: progressed(term_dir / "progress_0"), WAIT_S, "the SIGTERM job to start")
    subprocess.run(["scancel", "--signal=TERM", term.job_id], check=True, timeout=10)

    results = sub.wait(graceful, timeout_s=WAIT_S)
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["done"] == 40 and r["attempt"] == 2
        assert 0 < r["resumed_from"] < 40, "the requeued job must resume from the saved step"
    (c,) = sub.wait(classic, timeout_s=WAIT_S)
    assert c["done"] == 40 and c["attempt"] == 2
    assert c["resumed_from"][0] == 0 and 0 < c["resumed_from"][1] < 40
    term._results_timeout_s = 1  # submitit waits 15 s for a result file that will never come
    with pytest.raises(sub.JobFailed, match="without the pre-limit signal: no result written"):
        sub.wait(term, timeout_s=WAIT_S)
    assert not term.paths.result_pickle.exists() and "Requeued" not in (term.stdout() or "")
    log = graceful.task(0).stdout()  # submitit logs INFO to stdout
    assert "this job is preempted" in log and "Requeued job" in log  # a preemption: no timeout counted
    assert "asking the stage to checkpoint and stop" in graceful.task(1).stderr()


def test_time_limit_signal_from_slurm_requeues_until_done(time_limited_job):
    (result,) = sub.wait(time_limited_job, timeout_s=240)
    assert result["done"] == 350 and result["attempt"] >= 2 and result["resumed_from"] > 0
    log = time_limited_job.stdout()
    assert "Caught signal SIGUSR2" in log and "this job is timed-out" in log
