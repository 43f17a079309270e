"""pretrain.watchdog on real torch stores and a real (one-process, gloo) DeepSpeed engine."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from pretrain.watchdog import EXIT_STALLED, Watchdog


def test_a_silent_rank_is_named_with_its_last_step_and_the_live_one_exits():
    store = dist.HashStore()
    exits: list[tuple[int, int]] = []
    lines: list[str] = []
    frozen = Watchdog(store, 1, 2, timeout_s=1.0, interval_s=0.1, exit=lambda code: exits.append((1, code)))
    frozen.start(0)
    frozen.progress(7)
    frozen.stop()  # from now on rank 1 publishes nothing, as a SIGSTOPped process would
    live = Watchdog(
        store, 0, 2, timeout_s=1.0, interval_s=0.1, on_stall=lines.append, exit=lambda code: exits.append((0, code))
    )
    live.start(7)
    deadline = time.monotonic() + 10
    while not exits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert exits == [(0, EXIT_STALLED)]
    assert len(lines) == 1 and "rank 1 (last finished step 7" in lines[0] and "no step for" in lines[0], lines


def test_progress_keeps_it_quiet_and_a_timed_out_collective_fires():
    exits: list[int] = []
    dog = Watchdog(dist.HashStore(), 0, 1, timeout_s=0.6, interval_s=0.1, exit=exits.append).start(0)
    for step in range(1, 12):
        time.sleep(0.1)
        dog.progress(step)
    assert exits == []
    dog.check_error(RuntimeError("an unrelated error"))
    dog.check_error(RuntimeError("[gloo] Timed out waiting 30000ms"))  # the text alone: not a stall
    assert exits == []
    dog.stop()  # the thread would fire by itself; here the error path must
    time.sleep(0.7)  # a collective waits the group timeout (= timeout_s) before it raises
    dog.check_error(ValueError("Timeout"))  # not a type a collective raises
    assert exits == []
    dog.check_error(RuntimeError("[gloo] Application timeout caused pair closure"))
    assert exits == [EXIT_STALLED]


def test_stalls_in_a_row_without_a_checkpoint_exit_without_requeue(tmp_path, monkeypatch):
    from pretrain.run_status import RunStatus, read_run_status
    from pretrain.watchdog import EXIT_STALLED_AGAIN, STALL_HOOKS

    requeued: list[str] = []
    STALL_HOOKS.append(requeued.append)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # each attempt is a requeued job
    try:
        codes = []
        for attempt in range(4):  # each attempt resumes from step 4's checkpoint and stalls before the next
            status = RunStatus(tmp_path, 16, 4, tmp_path / "step_00000004", read_run_status(tmp_path))
            status.write("running")
            exits: list[int] = []
            dog = Watchdog(
                dist.HashStore(),
                0,
                1,
                timeout_s=0.3,
                interval_s=0.1,
                on_stall=lambda line, s=status: s.write("stalled", reason=line),
                exit=exits.append,
                may_requeue=lambda s=status: s.faults_in_a_row() <= 2,
            )
            dog.start(5)
            deadline = time.monotonic() + 10
            while not exits and time.monotonic() < deadline:
                time.sleep(0.05)
            codes.append(exits[0])
            record = read_run_status(tmp_path)
            assert record["faults_in_a_row"] == attempt + 1 and record["restarts"] == attempt + 1, record
        assert codes == [EXIT_STALLED, EXIT_STALLED, EXIT_STALLED_AGAIN, EXIT_STALLED_AGAIN]
        assert len(requeued) == 2 and "not requeued" in record["reason"], record
        # a new checkpoint since the last stall: progress, the count starts again
        status = RunStatus(tmp_path, 16, 4, tmp_path / "step_00000004", read_run_status(tmp_path))
        status.checkpoint = str(tmp_path / "step_00000008")
        assert status.faults_in_a_row() == 1
    finally:
        STALL_HOOKS.remove(requeued.append)


def test_every_fault_kind_counts_toward_the_cap_on_automatic_restarts_and_a_person_resets_it(tmp_path, monkeypatch):
    from pretrain.run_status import NoProgressError, RunStatus, read_run_status

    ckpt4 = tmp_path / "step_00000004"

    def attempt(restart_count: int) -> RunStatus:
        monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", str(restart_count))
        return RunStatus(tmp_path, 16, 4, ckpt4, read_run_status(tmp_path), resumed=True)

    first = attempt(0)
    first.check_progress(cap=2)
    first.write("running")
    first.write("failed", reason="RuntimeError: Connection closed by peer")  # a killed peer
    second = attempt(1)
    second.check_progress(cap=2)
    second.write("running")  # then SIGKILLed itself: no last word, no new checkpoint
    third = attempt(2)
    assert third.faults_before == 2
    third.check_progress(cap=2)
    third.write("diverged", reason="NonFiniteLossError: 5 non-finite losses in a row")
    fourth = attempt(3)
    with pytest.raises(NoProgressError, match=r"^not training: 3 attempts in a row .*\(the last: NonFinite"):
        fourth.check_progress(cap=2)
    # a checkpoint since the start is progress: the next fault is the first in a row
    fourth.checkpoint = str(tmp_path / "step_00000008")
    fourth.write("running")
    assert read_run_status(tmp_path)["faults_in_a_row"] == 0
    fourth.write("failed", reason="OSError: disk full")
    assert read_run_status(tmp_path)["faults_in_a_row"] == 1
    # a person's relaunch (a new torchrun: restart count 0) starts the count again
    third.write("failed", reason="again")
    assert attempt(0).faults_before == 0


# In a fresh interpreter: DeepSpeed caches its groups per process, so a group an earlier test made in the
# pytest process would be the one measured.
_GROUPS = r"""
import json, os, socket
import torch, deepspeed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
from pretrain.watchdog import group_timeouts, set_default_group_timeout
deepspeed.init_distributed(timeout=set_default_group_timeout(42), verbose=False)
model = torch.nn.Linear(4, 4)
deepspeed.initialize(model=model, model_parameters=model.parameters(), config={
    "train_batch_size": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
    "zero_optimization": {"stage": 2}})
print(json.dumps(group_timeouts()))
"""


def test_every_process_group_deepspeed_makes_gets_the_stall_timeout():
    pytest.importorskip("deepspeed")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", _GROUPS], cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    timeouts = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(timeouts) >= 2 and set(timeouts.values()) == {42.0}, timeouts
