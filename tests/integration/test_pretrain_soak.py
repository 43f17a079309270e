"""The soak at CI size (`python -m bench.soak --quick`'s code path): one ZeRO-2 run of the tiny recipe on
real shards under `torchrun --max-restarts N ... --resume auto` meets 10 seeded faults at random steps, sent
from outside by bench.soak's driver: SIGKILL of a random rank, SIGSTOP of a rank (its peer's stall watchdog
ends the attempt), a truncated file in the newest checkpoint followed by a kill (the restart falls back to
the previous checkpoint, in one line), and two SIGTERM preemptions, each relaunched on another world size
(2 ranks, then 1, then 2 again). No fault needs a person.

Then every sample of the order was trained on exactly once, in order, and the final weights equal an
uninterrupted 2-rank run's to fp32 precision, not bitwise: on 1 rank the same global batch is accumulated in
4 micro-batches instead of being reduced over 2 ranks of 2, so the sums round differently (the final weights
differ by ~1e-7 relative, as between ZeRO stages). Restarts on the same world size alone keep the weights
bitwise (tests/integration/test_elastic_restart.py)."""

from __future__ import annotations

import psutil
import pytest
from test_pretrain_runs import shards  # noqa: F401 (fixture)

from bench.soak import QUICK, soak

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # a backstop: the soak has its own deadlines
RELATIVE_TOLERANCE = 1e-5  # fp32 on CPU, another reduction order on 1 rank


def test_a_run_survives_ten_seeded_faults_on_its_own_and_ends_with_the_uninterrupted_weights(shards, tmp_path):  # noqa: F811
    result = soak(shards, tmp_path, QUICK, seed=0, timeout_s=900)
    (stage,) = result["stages"]
    faults = stage["faults"]
    summary = [(f["number"], f["kind"], f["world_size"], f["fired_step"], f["resumed_step"]) for f in faults]
    assert stage["completed"] and stage["faults_survived"] == QUICK.faults == 10, (summary, stage["final_status"])
    assert stage["kinds"]["preempt"] == 2 and min(stage["kinds"].values()) >= 1, stage["kinds"]
    assert 1 in stage["world_sizes"] and stage["world_sizes"][0] == stage["world_sizes"][-1] == 2
    assert stage["launches"] == 3  # the first launch and two relaunches after the preemptions: torchrun did the rest

    # each corrupt checkpoint: the restart fell back to the previous one and said so in one line
    lines = stage["fallback_lines"]
    assert len(lines) >= stage["kinds"]["corrupt"], lines
    for fault in (f for f in faults if f["kind"] == "corrupt"):
        corrupted = fault["detail"].split("/")[0]
        assert any(line.startswith(f"resume: {corrupted} is unreadable") for line in lines), (fault, lines)
        assert fault["resumed_step"] < int(corrupted.removeprefix("step_")), fault
    # what a fault costs: at most the steps since the last checkpoint (two intervals for a corrupt newest one)
    for fault in faults:
        bound = QUICK.checkpoint_every * (2 if fault["kind"] == "corrupt" else 1)
        assert 0 <= fault["recomputed_steps"] <= bound, fault

    assert stage["samples_ok"] and stage["samples_repeated"] == stage["samples_missing"] == 0, stage["samples"]
    assert stage["weights_max_rel_diff"] < RELATIVE_TOLERANCE, stage
    status = stage["final_status"]
    assert status["status"] == "completed" and status["step"] == QUICK.total_steps, status
    assert status["restarts"] >= 10 and status["last_fault"], status  # carried over every restart
    assert result["ok"]
    leftovers = [
        p.info for p in psutil.process_iter(["pid", "cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])
    ]
    assert not leftovers, leftovers
    weights = (
        "bitwise equal" if stage["weights_bitwise"] else f"max relative difference {stage['weights_max_rel_diff']:.1e}"
    )
    print(
        f"soak: {stage['faults_survived']} faults survived ({stage['kinds']}), {stage['restarts']} restarts, "
        f"lost {stage['lost_s_mean']:.1f} s per fault (max {stage['lost_s_max']:.1f}), "
        f"{stage['recomputed_steps_mean']:.1f} steps recomputed per fault; {stage['samples']}; final weights "
        f"{weights}"
    )
