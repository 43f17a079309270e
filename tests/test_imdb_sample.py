"""demo.imdb_sample: the cut of the demo's movie-review corpus. On a small file of its own, then (when
../shared holds the unlabelled IMDB reviews) that the shipped sample is exactly what the command makes."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from demo.imdb_sample import cut, main, write
from demo.sizes import CORPUS

ROOT = Path(__file__).resolve().parents[1]
UNSUP = ROOT.parent / "shared" / "data" / "corpus" / "imdb" / "unsup.jsonl.gz"


def source(path: Path, ids: list[str]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i in ids:
            f.write(json.dumps({"id": i, "text": f"Review {i}.<br /><br />Second  paragraph."}) + "\n")
    return path


def test_the_cut_is_a_stable_choice_with_line_breaks_as_spaces(tmp_path):
    ids = [f"train/unsup/{n}" for n in range(50)]
    rows = cut(source(tmp_path / "a.jsonl.gz", ids), 10)
    assert len(rows) == 10 and len({r["id"] for r in rows}) == 10
    assert rows[0]["text"] == f"Review {rows[0]['id']}. Second paragraph."
    assert [r["id"] for r in rows] != ids[:10]  # ranked by hash, not taken in file order
    # the same reviews in another order give the same sample, byte for byte
    again = cut(source(tmp_path / "b.jsonl.gz", ids[::-1]), 10)
    write(rows, tmp_path / "a.out.jsonl.gz")
    write(again, tmp_path / "b.out.jsonl.gz")
    assert (tmp_path / "a.out.jsonl.gz").read_bytes() == (tmp_path / "b.out.jsonl.gz").read_bytes()


def test_labelled_reviews_are_refused_in_one_line(tmp_path, capsys):
    src = source(tmp_path / "train.jsonl.gz", ["train/unsup/1", "train/pos/2"])
    assert main([str(src), str(tmp_path / "out.jsonl.gz"), "--reviews", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.jsonl.gz" in err and "unlabelled" in err
    assert not (tmp_path / "out.jsonl.gz").exists()


@pytest.mark.skipif(not UNSUP.is_file(), reason=f"{UNSUP} not present (../shared holds the real data)")
def test_the_shipped_sample_is_what_the_command_makes(tmp_path):
    out = tmp_path / "sample.jsonl.gz"
    assert main([str(UNSUP), str(out)]) == 0
    assert out.read_bytes() == CORPUS.read_bytes()
    assert CORPUS.stat().st_size <= 3_000_000  # the budget for shipped demo data
