"""bench.long --quick: the whole measurement's code path (fine-tuning both mixers at two lengths and two
seeds through `python -m finetune train --train-file`, pretraining throughput through torchrun and
pretrain/main.py, table and plot) on a small labelled jsonl file made here; then a rerun that skips
every finished cell, and a rerun with other settings that is refused."""

from __future__ import annotations

import gzip
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = "movie film plot actor scene story music camera script ending character director".split()


def write_reviews(path: Path, rows: int = 160) -> Path:
    """Reviews of 10-120 words, the label carried by a few sentiment words spread through the text."""
    rng = random.Random(0)
    with gzip.open(path, "wt") as handle:
        for i in range(rows):
            label = i % 2
            cue = ("great", "loved") if label else ("awful", "boring")
            words = [rng.choice(WORDS) if rng.random() > 0.15 else rng.choice(cue) for _ in range(rng.randint(10, 120))]
            handle.write(json.dumps({"id": f"r{i}", "text": " ".join(words), "label": label}) + "\n")
    return path


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bench.long", *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )


def test_quick_run_writes_table_plot_and_resumes(tmp_path):
    data = write_reviews(tmp_path / "reviews.jsonl.gz")
    out = tmp_path / "long"
    args = ["--quick", "--train-file", str(data), "--out", str(out)]
    result = run(args)
    assert result.returncode == 0, result.stderr[-4000:]

    report = json.loads((out / "results.json").read_text())
    assert report["command"] == "python -m bench.long " + " ".join(args)
    rows = report["finetune"]["rows"]
    assert sorted((r["length"], r["mixer"]) for r in rows) == sorted(
        (length, mixer) for length in (32, 64) for mixer in ("hypermixer", "transformer")
    )
    for r in rows:
        assert len(r["accuracy"]) == 2 and all(0.0 <= a <= 1.0 for a in r["accuracy"])
        assert r["train_seconds_per_epoch"] > 0 and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
    # longer inputs read more of each review: more training tokens per epoch at 64 than at 32
    tokens = {r["length"]: r["train_tokens_per_epoch"] for r in rows}
    assert tokens[64] > tokens[32]
    assert [c["length"] for c in report["finetune"]["hypermixer_vs_transformer"]] == [32, 64]
    # the transformer fine-tunes without attention dropout: torch's fused SDPA path
    assert report["attention_dropout"]["transformer"]["fused_sdpa_path"]
    assert report["attention_dropout"]["transformer"]["blocks"] == [0.0]
    pretrain = report["pretrain"]["rows"]
    assert sorted(r["mixer"] for r in pretrain) == ["hypermixer", "transformer"]
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0 and r["length"] == 64 for r in pretrain)
    assert (out / "long.png").stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "Fine-tuning:" in table and "Pretraining throughput:" in table

    # a rerun skips every finished cell: their records stay as they were
    cells = sorted(out.glob("work/*/*/cell.json"))
    assert len(cells) == 8 + 2
    before = {p: p.stat().st_mtime_ns for p in cells}
    again = run(args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in cells} == before
    assert json.loads((out / "results.json").read_text())["finetune"]["rows"] == rows

    # a fresh clone holds results.json but not the work folder: a rerun runs only the cells it lacks
    shutil.rmtree(out / "work")
    recorded = json.loads((out / "results.json").read_text())
    dropped = recorded["finetune"]["cells"].pop(0), recorded["pretrain"]["rows"].pop(0)
    (out / "results.json").write_text(json.dumps(recorded))
    again = run(args)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [p.parent.name for p in sorted(out.glob("work/*/*/cell.json"))] == [
        f"{dropped[0]['length']}-{dropped[0]['mixer']}-seed{dropped[0]['seed']}",
        f"{dropped[1]['length']}-{dropped[1]['mixer']}",
    ]
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["finetune"]["cells"][1:] == recorded["finetune"]["cells"]
    assert rerun["cells_finished"] == rerun["cells_planned"] == 10
    # the one fine-tuning cell run again, on the same data, seed and random release, scores about as recorded:
    # a full-suite run once scored 0.55 against 0.6 (2 of 40 dev reviews; not reproduced alone), so not exactly
    assert abs(rerun["finetune"]["cells"][0]["accuracy"] - dropped[0]["accuracy"]) <= 0.1

    # the same data in another place (another clone's ../shared): the record is continued, nothing runs again
    moved = tmp_path / "elsewhere" / data.name
    moved.parent.mkdir()
    shutil.copy(data, moved)
    cells = sorted(out.glob("work/*/*/cell.json"))
    before = {p: p.stat().st_mtime_ns for p in cells}
    again = run(["--quick", "--train-file", str(moved), "--out", str(out)])
    assert again.returncode == 0, again.stderr[-4000:]
    assert {p: p.stat().st_mtime_ns for p in cells} == before

    # other settings into the same folder: refused, naming what differs
    other = run([*args, "--epochs", "2"])
    assert other.returncode == 2
    assert "epochs: 1 there, 2 now" in other.stderr and "use another --out" in other.stderr


def save_release(folder: Path, mixer: str, attention_dropout: float) -> Path:
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM

    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_seq_len=16, mixer=mixer
    )
    ForMaskedLM(config.replace(attention_dropout=attention_dropout)).save_pretrained(folder)
    (folder / "tokenizer.json").write_text("{}")
    return folder


def test_a_release_with_attention_dropout_is_fine_tuned_from_a_copy_without(tmp_path):
    from bench.long import attention_dropout_check, without_attention_dropout

    release = save_release(tmp_path / "tf", "transformer", 0.1)
    assert not attention_dropout_check(release, 64)["fused_sdpa_path"]
    copy = without_attention_dropout("transformer", release, tmp_path / "work")
    assert copy != release and (copy / "model.safetensors").read_bytes() == (release / "model.safetensors").read_bytes()
    check = attention_dropout_check(copy, 64)
    assert check == {"config": 0.0, "blocks": [0.0], "fused_sdpa_path": True}
    assert json.loads((release / "config.json").read_text())["encoder"]["attention_dropout"] == 0.1  # untouched
    without = save_release(tmp_path / "tf0", "transformer", 0.0)
    assert without_attention_dropout("transformer", without, tmp_path / "work") == without


def test_releases_are_one_per_mixer_and_both_or_none(tmp_path):
    import pytest

    from bench.long import BenchError, given_releases

    hm = save_release(tmp_path / "hm", "hypermixer", 0.0)
    tf = save_release(tmp_path / "tf", "transformer", 0.0)
    assert given_releases([f"hypermixer={hm}", f"transformer={tf}"]) == {"hypermixer": hm, "transformer": tf}
    with pytest.raises(BenchError, match="the release is a transformer, not a hypermixer"):
        given_releases([f"hypermixer={tf}", f"transformer={tf}"])
    with pytest.raises(BenchError, match="give a release for both mixers"):
        given_releases([f"hypermixer={hm}"])
    with pytest.raises(BenchError, match="expected hypermixer=FOLDER"):
        given_releases([str(hm)])


def test_a_record_compares_releases_by_their_weights_not_by_where_they_lie(tmp_path):
    from dataclasses import asdict, replace

    from bench.long import FULL, parse_args, setup_changes, setup_of

    train = write_reviews(tmp_path / "train.jsonl.gz", rows=8)
    here = setup_of(parse_args(["--train-file", str(train)]), FULL)
    here.releases, here.release_sha256 = {"hypermixer": "/a/hm"}, {"hypermixer": "ab12"}
    elsewhere = replace(here, train_file="/other/train.jsonl.gz", releases={"hypermixer": "/b/hm"})
    assert setup_changes(asdict(elsewhere), here) == []  # the same files, moved: the record continues
    other_weights = replace(here, release_sha256={"hypermixer": "cd34"})
    assert setup_changes(asdict(other_weights), here) == [
        "release_sha256: {'hypermixer': 'cd34'} there, {'hypermixer': 'ab12'} now"
    ]
    # a record written before release_sha256 existed: from scratch, so its default ({}) is what it held
    scratch = setup_of(parse_args(["--train-file", str(train)]), FULL)
    older = {k: v for k, v in asdict(scratch).items() if k != "release_sha256"}
    assert setup_changes(older, scratch) == []
    assert setup_changes(older, here) != []
