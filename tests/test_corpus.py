"""bench.corpus: the held-out split by id hash, its refusals, and the whole benchmark at toy size."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from bench import corpus, recipe_sweep

ROOT = Path(__file__).resolve().parents[1]
WIKI = ROOT / "demo" / "data" / "corpus" / "wikitext-2-valid.txt"


def paragraphs() -> list[str]:
    return [line.strip() for line in WIKI.read_text(encoding="utf-8").splitlines() if len(line.strip()) > 200]


def write_corpus(path: Path, texts: list[str], prefix: str = "doc") -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        for i, text in enumerate(texts):
            handle.write(json.dumps({"id": f"{prefix}/{i}", "text": text}) + "\n")
    return path


def test_split_is_fixed_by_id_disjoint_and_drops_duplicate_texts(tmp_path):
    texts = paragraphs()[:300]
    texts.append(texts[0])  # an exact duplicate under another id
    first = write_corpus(tmp_path / "a.jsonl.gz", texts)
    split = corpus.split_corpus([first], 0.1, "text", "id", tmp_path / "one", None)
    train = [json.loads(line) for line in (tmp_path / "one" / "train.jsonl").open()]
    held = [json.loads(line) for line in (tmp_path / "one" / "heldout.jsonl").open()]
    assert {d["id"] for d in train}.isdisjoint(d["id"] for d in held)
    assert {" ".join(d["text"].split()) for d in train}.isdisjoint(" ".join(d["text"].split()) for d in held)
    assert split["train_documents"] + split["heldout_documents"] + split["heldout_dropped_as_duplicates"] == 301
    assert 10 <= len(held) <= 55  # ~10% of 301 by hash
    assert all(corpus.held_out(d["id"], 0.1) for d in held)
    # the same documents in another order: the same held-out ids
    reverse = tmp_path / "b.jsonl"
    reverse.write_text("".join(json.dumps({"id": f"doc/{i}", "text": texts[i]}) + "\n" for i in reversed(range(301))))
    corpus.split_corpus([reverse], 0.1, "text", "id", tmp_path / "two", None)
    again = [json.loads(line) for line in (tmp_path / "two" / "heldout.jsonl").open()]
    assert sorted(d["id"] for d in again) == sorted(d["id"] for d in held)


def test_bad_corpus_and_overlapping_heldout_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        corpus.read_documents(tmp_path / "missing.jsonl", "text", "id", None)
    assert "--corpus" in capsys.readouterr().err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(SystemExit):
        corpus.read_documents(empty, "text", "id", None)
    assert "no documents" in capsys.readouterr().err
    fieldless = tmp_path / "fieldless.jsonl"
    fieldless.write_text(json.dumps({"id": "x", "body": "some words"}) + "\n")
    with pytest.raises(SystemExit):
        corpus.read_documents(fieldless, "text", "id", None)
    err = capsys.readouterr().err
    assert "'text'" in err and "body" in err and err.count("\n") == 1
    train = tmp_path / "train.jsonl"
    texts = paragraphs()[:20]
    train.write_text("".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join([texts[3], texts[5], "a line of its own"]) + "\n")
    with pytest.raises(SystemExit):
        corpus.check_no_overlap(ood, train)
    assert "2 of its 3 lines are training documents" in capsys.readouterr().err


@pytest.mark.slow
def test_kept_release_with_another_tokenizer_is_refused(tmp_path, capsys):
    rebuilt = tmp_path / "data" / "tokenizer.json"
    rebuilt.parent.mkdir()
    rebuilt.write_text('{"model": "rebuilt"}')
    kept = tmp_path / "releases" / "hypermixer-s0-10M"
    kept.mkdir(parents=True)
    (kept / "tokenizer.json").write_text('{"model": "rebuilt"}')
    corpus.check_releases_share_tokenizer(tmp_path / "releases", rebuilt)  # same bytes: accepted
    (kept / "tokenizer.json").write_text('{"model": "other"}')
    with pytest.raises(corpus.BenchError):
        corpus.check_releases_share_tokenizer(tmp_path / "releases", rebuilt)
    (line,) = capsys.readouterr().err.splitlines()
    assert "hypermixer-s0-10M/tokenizer.json: differs from the rebuilt" in line


def test_quick_run_writes_curves_and_release_readings(tmp_path, capsys):
    texts = paragraphs()
    data = write_corpus(tmp_path / "corpus.jsonl.gz", texts[:-40])
    ood = tmp_path / "ood.txt"
    ood.write_text("\n".join(texts[-40:]) + "\n")
    labelled = tmp_path / "labelled.jsonl"  # a stand-in for IMDB's labelled reviews
    labelled.write_text(
        "".join(json.dumps({"id": f"r/{i}", "text": t, "label": i % 2}) + "\n" for i, t in enumerate(texts[:200]))
    )
    out = tmp_path / "out"
    args = ["--quick", "--out", str(out), "--corpus", str(data), "--ood", str(ood), "--models", "hypermixer"]
    args += ["--imdb", str(labelled), "--glue-dir", str(ROOT / "demo" / "data" / "glue"), "--finetune-seeds", "0"]
    assert corpus.main(args) == 0
    report = json.loads((out / "results.json").read_text())
    curve = report["pretraining"]["hypermixer-s0"]
    assert curve["tokens"][-1] == report["budget"]["steps"] * corpus.QUICK.global_batch * corpus.SEQ_LEN
    assert sorted(report["releases"]) == [
        f"hypermixer-s0-{corpus.tokens_label(t)}" for t in sorted(corpus.QUICK.release_tokens)
    ]
    for reading in report["releases"].values():
        assert reading["in-domain"]["masked_tokens"] > 0 and reading["ood"]["masked_tokens"] > 0
    # the final release, read again, gives the loss the trainer logged at its last evaluation
    last = report["releases"][f"hypermixer-s0-{corpus.tokens_label(corpus.QUICK.release_tokens[-1])}"]
    assert last["in-domain"]["loss"] == pytest.approx(curve["loss"][-1], rel=1e-4)
    assert (out / "pretraining.png").is_file() and (out / "wallclock.png").is_file()
    # fine-tuning: SST-2 from scratch and IMDB (a file task) from the last release
    done = {(r["task"], r["init"]) for r in report["finetune_runs"]}
    assert done == {("SST-2-n2000", "scratch"), ("imdb-n2000", "pretrained")}
    assert all(0 <= r["score"] <= 1 for r in report["finetune_runs"])
    assert "Downstream against pretraining tokens" in (out / "results.md").read_text()
    # a rerun reuses every stage
    assert corpus.main(args) == 0
    # a fresh clone has results.json but none of the ignored work files: a rerun runs nothing again
    first = json.loads((out / "results.json").read_text())
    for work in ("pretrain", "releases", "finetune", "logs"):
        shutil.rmtree(out / work)
    assert corpus.main(args) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["finetune_runs"] == first["finetune_runs"] and again["releases"] == first["releases"]
    assert again["pretraining"] == first["pretraining"]
    assert not any((out / work).exists() for work in ("pretrain", "releases", "finetune"))
    # --report-only reads the fine-tuning runs recorded or finished so far and runs none of the others
    again["finetune_runs"] = [r for r in again["finetune_runs"] if r["init"] == "pretrained"]
    # (and the record says the IMDB run's release read otherwise: a rerun that makes it again makes another model)
    imdb_release = next(r["model"] for r in again["finetune_runs"])
    again["releases"][imdb_release]["in-domain"]["loss"] += 0.5
    (out / "results.json").write_text(json.dumps(again))
    assert corpus.main([*args, "--report-only"]) == 0
    partial = json.loads((out / "results.json").read_text())
    assert [(r["task"], r["init"]) for r in partial["finetune_runs"]] == [("imdb-n2000", "pretrained")]
    assert "1 of 2 fine-tuning runs finished so far." in (out / "results.md").read_text()
    assert not (out / "finetune").exists()
    # the one run left needs a release whose files are gone: the recorded pretraining run is repeated (on the
    # same data, seed and recipe it gives the recorded curve) and the run is fine-tuned from its release; the
    # release made again reads unlike the record, so the run fine-tuned from it is repeated too
    assert corpus.main(args) == 0
    rerun = json.loads((out / "results.json").read_text())
    assert rerun["pretraining"]["hypermixer-s0"]["rerun"] == {
        "evaluations": len(curve["tokens"]),
        "max_loss_difference": 0.0,
    }

    def scores(report: dict) -> list[dict]:  # a run's record but its seconds
        return [{k: v for k, v in r.items() if k != "seconds"} for r in report["finetune_runs"]]

    assert scores(rerun) == scores(first)
    assert rerun["releases"] == first["releases"]
    assert len(list((out / "finetune").iterdir())) == 2
    # a results.json written with another budget is refused, not mixed in
    wrong = {**rerun, "budget": {**rerun["budget"], "global_batch": 17}}
    (out / "results.json").write_text(json.dumps(wrong))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        corpus.main(args)
    assert "results.json: written with another budget" in capsys.readouterr().err
    (out / "results.json").write_text(json.dumps(rerun))
    # bench.recipe_sweep on the same data folder: equal tokens, one change per run, the same held-out masks
    sweep = ["--quick", "--out", str(out), "--corpus", str(data), "--ood", str(ood), "--models", "hypermixer"]
    sweep += ["--variants", "recipe,batch128,tied"]
    assert recipe_sweep.main(sweep) == 0
    runs = {r["variant"]: r for r in json.loads((out / "sweep.json").read_text())["runs"]}
    assert list(runs) == ["recipe", "batch128", "tied"] and all(r["done"] for r in runs.values())
    assert {r["tokens"][-1] for r in runs.values()} == {json.loads((out / "sweep.json").read_text())["sweep_tokens"]}
    assert runs["batch128"]["steps"] * 2 == runs["recipe"]["steps"]
    assert runs["batch128"]["global_batch"] == 2 * runs["recipe"]["global_batch"]
    assert len({r["masked_tokens"] for r in runs.values()}) == 1
    states = {
        name: json.loads(
            next(
                (out / "pretrain" / f"sweep-hypermixer-{name}" / "checkpoints").glob("step_*/trainer_state.json")
            ).read_text()
        )
        for name in runs
    }
    assert [s["fingerprint"]["model"]["hypermixer_tied"] for s in states.values()] == [False, False, True]
    assert (out / "sweep.png").stat().st_size > 0
    # a rerun trains nothing; an unknown variant is one line
    metrics = out / "pretrain" / "sweep-hypermixer-tied" / "metrics.jsonl"
    before = metrics.stat().st_mtime_ns
    assert recipe_sweep.main(sweep) == 0 and metrics.stat().st_mtime_ns == before
    with pytest.raises(SystemExit):
        recipe_sweep.main([*sweep[:-1], "recipe,lr9"])
    assert "--variants: unknown 'lr9'" in capsys.readouterr().err

    # a block-layout variant of bench.quality (`-post`: BERT's post-LN) pretrains with its setting, releases kept
    assert corpus.main([*args[:-8], "--models", "hypermixer-post", "--no-finetune"]) == 0
    post = json.loads((out / "results.json").read_text())
    # the report keeps what this --out recorded for the runs not asked for this time
    assert sorted(post["releases"]) == [
        f"hypermixer-{kind}s0-{corpus.tokens_label(t)}" for kind in ("post-", "") for t in corpus.QUICK.release_tokens
    ]
    assert list(post["pretraining"]) == ["hypermixer-post-s0", "hypermixer-s0"] and post["finetune_runs"]
    state = next((out / "pretrain" / "hypermixer-post-s0" / "checkpoints").glob("step_*/trainer_state.json"))
    assert json.loads(state.read_text())["fingerprint"]["model"]["norm_position"] == "post"
