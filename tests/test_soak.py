"""bench.soak's fault schedule: seeded, at distinct steps, every kind the soak promises, on world sizes where
each can be noticed."""

from __future__ import annotations

import pytest

from bench.soak import FULL, QUICK, draw_faults


@pytest.mark.parametrize(("size", "count", "seed"), [(QUICK, 10, 0), (QUICK, 10, 7), (FULL, 16, 0), (FULL, 20, 3)])
def test_a_schedule_holds_every_fault_kind_and_changes_the_world_size_2_1_2(size, count, seed):
    faults = draw_faults(count, seed, size)
    assert [(f.kind, f.at_step, f.rank) for f in faults] == [
        (f.kind, f.at_step, f.rank) for f in draw_faults(count, seed, size)
    ]
    steps = [f.at_step for f in faults]
    assert len(faults) == count and steps == sorted(set(steps)), steps
    assert size.checkpoint_every < steps[0] and steps[-1] < size.total_steps - 1  # after a checkpoint, before the end
    kinds = [f.kind for f in faults]
    assert kinds.count("preempt") == 2 and {"kill", "stop", "corrupt"} <= set(kinds), kinds
    first, second = (i for i, kind in enumerate(kinds) if kind == "preempt")
    assert second > first + 1  # at least one fault on 1 rank
    worlds = [f.world_size for f in faults]
    assert worlds == [1 if first < i < second else 2 for i in range(count)], worlds
    assert all(f.world_size == 2 for f in faults if f.kind == "stop")  # a lone stopped rank has no peer to notice
    assert all(0 <= f.rank < f.world_size for f in faults)
    for f in faults:
        if f.kind == "corrupt":  # a checkpoint to corrupt after it, and one before to fall back to
            assert f.at_step <= size.total_steps - 2 * size.checkpoint_every
