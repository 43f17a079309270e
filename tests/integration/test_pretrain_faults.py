"""Faults a cluster user meets, on the real DeepSpeed engine (2 CPU processes over gloo, torchrun):
a stalled rank, and a resume after it. Reuses test_pretrain_runs's shards, launcher and reference run."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from pretrain import checkpoint as ckpt
from pretrain.watchdog import EXIT_STALLED
from test_pretrain_runs import completed, launch, losses, shards, status, zero2  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow
STALL_TIMEOUT_S = 30


def _job_processes(run_dir: Path) -> list[str]:
    """Processes whose command line names this run's folder (launcher, ranks, data workers)."""
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if str(run_dir) in line and "ps -eo" not in line]


def test_sigstopped_rank_ends_the_job_and_resume_reproduces_the_run(shards, zero2, tmp_path):
    run_dir = tmp_path / "run"
    stage = "deepspeed.zero_optimization.stage=2"
    stalled = launch(run_dir, shards, stage, f"train.stall_timeout_s={STALL_TIMEOUT_S}", fault="stop:1:5")
    ended = time.time()
    assert stalled.rc != 0, stalled.output[-4000:]
    frozen = [float(line.rsplit(" at ", 1)[1]) for line in stalled.output.splitlines()
              if line.startswith("fault injection: rank 1 SIGSTOPs")]
    assert len(frozen) == 1, stalled.output[-4000:]
    seconds = ended - frozen[0]
    assert seconds < 2 * STALL_TIMEOUT_S, f"the job took {seconds:.0f}s to end after the SIGSTOP"
    assert not _job_processes(run_dir), _job_processes(run_dir)
    lines = [line for line in stalled.output.splitlines() if "stalled:" in line]
    assert len(lines) == 1, stalled.output[-4000:]
    assert "rank 1 (last finished step 5" in lines[0] and f"code {EXIT_STALLED}" in lines[0], lines[0]
    record = status(run_dir)
    assert record["status"] == "stalled" and record["step"] == 5 and "rank 1" in record["reason"], record
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == ckpt.tag_for(4)
    print(f"SIGSTOP of rank 1 at step 5, stall_timeout_s={STALL_TIMEOUT_S}: the job ended {seconds:.1f}s after it; "
          f"{lines[0]}")
    resumed = launch(run_dir, shards, stage, f"train.stall_timeout_s={STALL_TIMEOUT_S}", resume="auto")
    completed(run_dir, resumed)
    assert losses(run_dir, "train") == losses(zero2, "train")
    assert losses(run_dir, "eval") == losses(zero2, "eval")
