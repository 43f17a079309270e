"""Unattended restart under torchrun (torchelastic): a rank SIGKILLed mid-run is restarted by
`torchrun --max-restarts`, the new workers resume from the newest checkpoint (`--resume auto`), and the
job ends on its own with the same weights, bit for bit, as a run that was never interrupted (no dropout,
the same world size, so the same reduction order). The kill comes from outside, as an OOM killer's would,
between two checkpoints."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from test_pretrain_runs import COMMON, MAIN, ROOT, shards, status  # noqa: F401 (fixture)

from bench.soak import kill_job
from pretrain import checkpoint as ckpt
from pretrain.export import consolidated_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # a backstop: each launch has its own timeout
LAUNCH_TIMEOUT_S = 420  # a fresh machine compiles DeepSpeed's shared-memory op first
STEPS = 24  # checkpoints at 8, 16, 24: the kill lands after the first one and before the end
SETTINGS = [
    *COMMON,
    "model.dropout=0.0",
    "model.attention_dropout=0.0",
    f"optim.total_steps={STEPS}",
    "checkpoint.every_steps=8",
    "checkpoint.keep_last=3",
    "eval.every_steps=12",
]


def start(run_dir: Path, data_path: str) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=2",
        str(MAIN),
        "--config",
        "tiny",
        "--set",
        f"data.path={data_path}",
        f"output_dir={run_dir}",
        *SETTINGS,
        "--resume",
        "auto",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def finish(proc: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {timeout}s:\n{output[-4000:]}")
    return proc.returncode, output


def rank_process(launcher: psutil.Process, rank: int) -> psutil.Process | None:
    """The worker process of `rank` among torchrun's children (not its data-loader workers)."""
    for child in launcher.children():
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            if child.environ().get("RANK") == str(rank):
                return child
    return None


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert final is not None and final.name == ckpt.tag_for(STEPS), final
    return consolidated_weights(final, ckpt.read_state(final)["zero_stage"])


def test_a_killed_rank_is_restarted_by_torchrun_and_the_run_ends_with_the_uninterrupted_weights(request, tmp_path):
    shard_dir = request.getfixturevalue("shards")
    reference_dir = tmp_path / "uninterrupted"
    rc, output = finish(start(reference_dir, shard_dir))
    assert rc == 0 and status(reference_dir)["status"] == "completed", output[-4000:]

    run_dir = tmp_path / "killed"
    proc = start(run_dir, shard_dir)
    try:
        first = run_dir / "checkpoints" / ckpt.tag_for(8)
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        while not ckpt.is_complete(first) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = rank_process(psutil.Process(proc.pid), 1)
        assert victim is not None and ckpt.latest_checkpoint(run_dir / "checkpoints") == first, "no rank 1 to kill"
        victim.send_signal(signal.SIGKILL)
        rc, output = finish(proc)
    finally:
        kill_job(proc)  # whatever failed above, no rank outlives the test

    assert rc == 0, output[-4000:]
    assert status(run_dir)["status"] == "completed", status(run_dir)
    resumed = [line for line in output.splitlines() if line.startswith("resuming from")]
    assert len(resumed) == 1 and ckpt.tag_for(8) in resumed[0], output[-4000:]
    assert "connectFullMesh" not in output
    reference, restarted = final_weights(reference_dir), final_weights(run_dir)
    assert reference.keys() == restarted.keys()
    assert all(torch.equal(reference[name], restarted[name]) for name in reference), "weights differ"
