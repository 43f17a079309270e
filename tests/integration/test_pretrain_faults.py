"""Faults a cluster user meets, on the real DeepSpeed engine (2 CPU processes over gloo, torchrun):
a stalled rank, and a resume after it. Reuses test_pretrain_runs's shards, launcher and reference run."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
from test_pretrain_runs import completed, launch, losses, shards, status, zero2  # noqa: F401 (fixtures)

from pretrain import checkpoint as ckpt
from pretrain.watchdog import EXIT_STALLED

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
    frozen = [
        float(line.rsplit(" at ", 1)[1])
        for line in stalled.output.splitlines()
        if line.startswith("fault injection: rank 1 SIGSTOPs")
    ]
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
    print(
        f"SIGSTOP of rank 1 at step 5, stall_timeout_s={STALL_TIMEOUT_S}: the job ended {seconds:.1f}s after it; "
        f"{lines[0]}"
    )
    resumed = launch(run_dir, shards, stage, f"train.stall_timeout_s={STALL_TIMEOUT_S}", resume="auto")
    completed(run_dir, resumed)
    assert losses(run_dir, "train") == losses(zero2, "train")
    assert losses(run_dir, "eval") == losses(zero2, "eval")


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem that fills up: an 8 MiB tmpfs (needs mount rights: root in CI containers)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_the_save_in_one_line_and_resume_auto_recovers_in_place(shards, small_disk):
    run_dir = small_disk / "run"
    one = ("deepspeed.zero_optimization.stage=1", "checkpoint.keep_last=1")
    first = launch(run_dir, shards, *one, "optim.total_steps=16", fault="signal:0:3:USR1", launcher="module")
    assert first.rc == 0 and status(run_dir)["status"] == "stopped", first.output[-3000:]
    step4 = run_dir / "checkpoints" / ckpt.tag_for(4)
    size = sum(p.stat().st_size for p in step4.rglob("*") if p.is_file())
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * max(0, free - size // 2))  # room for half a checkpoint
    full = launch(run_dir, shards, *one, resume="auto", launcher="module")
    lines = [line for line in full.output.splitlines() if "checkpoint step 8 failed" in line]
    assert full.rc == 4 and len(lines) == 1, full.output[-3000:]
    assert "step 4 is intact" in lines[0] and " MiB free)" in lines[0], lines[0]
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == ckpt.tag_for(4)
    assert (run_dir / "checkpoints" / ckpt.tag_for(8)).is_dir()  # the partial save, left by the failure
    assert not any((run_dir / "checkpoints" / name).exists() for name in ckpt.UNSAFE_CONVERTERS)
    print(f"full disk: {lines[0]}")
    filler.unlink()
    again = launch(run_dir, shards, *one, resume="auto", launcher="module")
    completed(run_dir, again)
    assert f"removed {run_dir / 'checkpoints' / ckpt.tag_for(8)}" in again.output, again.output[-3000:]
    assert [p.name for p in ckpt.checkpoint_folders(run_dir / "checkpoints")] == [ckpt.tag_for(16)]


class _Payload:
    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))  # harmless if it ever ran; the test fails if it does


def test_a_tampered_file_of_rank_1_is_refused_with_exit_2_under_the_deepspeed_launcher(shards, zero2, tmp_path):
    import shutil

    import torch

    run_dir = tmp_path / "run"
    shutil.copytree(zero2 / "checkpoints", run_dir / "checkpoints")
    step = ckpt.latest_checkpoint(run_dir / "checkpoints")
    target = step / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert target.is_file(), sorted(p.name for p in step.iterdir())
    torch.save({"optimizer_state_dict": _Payload()}, target)
    refused = launch(
        run_dir,
        shards,
        "deepspeed.zero_optimization.stage=2",
        "optim.total_steps=20",
        resume="auto",
        launcher="deepspeed",
    )
    assert refused.rc == 2, refused.output[-3000:]
    assert "PAYLOAD RAN" not in refused.output
    lines = [line for line in refused.output.splitlines() if "refusing to unpickle" in line]
    assert lines and target.name in lines[0], refused.output[-3000:]
    print(f"tampered rank-1 file: rc {refused.rc}; {lines[0]}")
