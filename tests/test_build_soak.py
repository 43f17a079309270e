"""bench.soak_build at small size: a build of four copies of WikiText-2 SIGKILLed 3 times at seeded moments (the process group,
then the driver alone, and so on), resumed each time, ends byte-identical to an uninterrupted build, and no
process of a killed attempt outlives it."""

import shutil
from pathlib import Path

import pytest

from bench.soak_build import soak

pytestmark = pytest.mark.slow
CORPUS = Path(__file__).resolve().parents[1] / "demo" / "data" / "corpus" / "wikitext-2-valid.txt"
OPTIONS = ["--vocab-size", "2000", "--seq-len", "64", "--shard-mb", "0.05", "--unit-mb", "0.2"]


def test_three_kills_leave_no_process_and_the_build_byte_identical(tmp_path):
    # Four copies of the text, and kills at least 0.3 s into an attempt: on an idle machine one copy builds in
    # about a second, and a build that ends before its kill leaves the rest of the schedule unsent.
    inputs = []
    for copy in range(4):
        inputs.append(tmp_path / f"wikitext-{copy}.txt")
        shutil.copyfile(CORPUS, inputs[-1])
    result = soak(
        [str(p) for p in inputs], tmp_path / "soak", OPTIONS, kills=3, seed=1, workers=2, timeout_s=300, min_gap_s=0.3
    )
    kills = result["kills"]
    assert result["kills_survived"] == 3, result  # every kill came before the build finished
    assert {k["mode"] for k in kills} == {"group", "driver"}
    assert all(k["phase"] in ("tokenizer", "units", "finalize") for k in kills), kills
    assert result["orphans_left"] == 0, result["orphan_processes"]
    assert result["shards_compared"] > 1 and result["differing"] == [] and result["identical"], result
    assert result["ok"]
