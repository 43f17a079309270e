"""bench.soak_build at small size: a WikiText-2 build SIGKILLed 3 times at seeded moments (the process group,
then the driver alone, and so on), resumed each time, ends byte-identical to an uninterrupted build, and no
process of a killed attempt outlives it."""

from pathlib import Path

import pytest

from bench.soak_build import soak

pytestmark = pytest.mark.slow
CORPUS = Path(__file__).resolve().parents[1] / "demo" / "data" / "corpus" / "wikitext-2-valid.txt"
OPTIONS = ["--vocab-size", "2000", "--seq-len", "64", "--shard-mb", "0.05", "--unit-mb", "0.2"]


def test_three_kills_leave_no_process_and_the_build_byte_identical(tmp_path):
    result = soak([str(CORPUS)], tmp_path / "soak", OPTIONS, kills=3, seed=1, workers=2, timeout_s=300)
    kills = result["kills"]
    assert result["kills_survived"] == 3, result  # every kill came before the build finished
    assert {k["mode"] for k in kills} == {"group", "driver"}
    assert all(k["phase"] in ("tokenizer", "units", "finalize") for k in kills), kills
    assert result["orphans_left"] == 0, result["orphan_processes"]
    assert result["shards_compared"] > 1 and result["differing"] == [] and result["identical"], result
    assert result["ok"]
