"""finetune on a user's own files: jsonl/csv/tsv (gzipped too), labels mapped and mapped back, the
fixed dev split and subset, long inputs in windows, position extension beyond a release's length,
and one clear line for each bad input.

Files are written here; models are tiny and mostly trained from scratch for one epoch. One test
reads the real IMDB training file from ../shared/data (skipped when it is absent).
"""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_finetune import make_release, make_tokenizer

from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.data import read_split
from finetune.errors import FinetuneError
from finetune.files import file_task, fixed_subset, read_file
from finetune.model import load
from finetune.positions import extend_positions
from finetune.sweep import aggregate, plan_sweep
from finetune.trainer import train
from hypermixer import ForMaskedLM, ForSequenceClassification

REPO = Path(__file__).resolve().parents[1]
IMDB = REPO.parent / "shared" / "data" / "corpus" / "imdb" / "train.jsonl.gz"

GOOD = "good great fun lovely fine".split()
BAD = "bad awful boring dull poor".split()


def review(i: int, positive: bool, words: int = 6) -> str:
    pool = GOOD if positive else BAD
    return " ".join(pool[(i + k) % len(pool)] if k % 2 == 0 else "the" for k in range(words))


def rows(n: int, labels=("neg", "pos"), start: int = 0) -> list[dict]:
    return [
        {"id": f"r{i}", "text": review(i, i % 2 == 1), "label": labels[i % 2], "other": "x"}
        for i in range(start, start + n)
    ]


def write_rows(path: Path, records: list[dict], columns: list[str] | None = None) -> Path:
    """records as jsonl, csv or tsv by the file's name; .gz compresses."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.name.endswith(".gz") else open
    name = path.name.removesuffix(".gz")
    with opener(path, "wt", encoding="utf-8", newline="") as handle:
        if name.endswith(".jsonl"):
            handle.writelines(json.dumps(r) + "\n" for r in records)
        else:
            columns = columns or list(records[0])
            writer = csv.writer(handle, delimiter="\t" if name.endswith(".tsv") else ",")
            writer.writerow(columns)
            writer.writerows([r.get(c, "") for c in columns] for r in records)
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([review(i, i % 2 == 1, 12) for i in range(40)] + ["the movie was x", "a b c d e f g"])


@pytest.fixture(scope="module")
def release(tmp_path_factory, tokenizer) -> Path:
    return make_release(tmp_path_factory.mktemp("release") / "hm", "hypermixer", tokenizer)


def settings(release: Path, out: Path, **kw) -> FinetuneConfig:
    base = dict(
        release=str(release),
        output_dir=str(out),
        from_scratch=True,
        epochs=1,
        batch_size=4,
        learning_rate=1e-3,
        device="cpu",
        eval_batch_size=8,
    )
    return FinetuneConfig(**{**base, **kw})


def predictions(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


# ---- training on files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv.gz", ".tsv"])
def test_train_from_scratch_on_each_format_writes_original_labels(release, tmp_path, suffix):
    data = tmp_path / "data"
    train_file = write_rows(data / f"reviews{suffix}", rows(24))
    dev_file = write_rows(data / f"dev{suffix}", rows(8, start=100))
    test_file = write_rows(data / f"test{suffix}", [{"id": f"t{i}", "text": review(i, i < 3)} for i in range(5)])
    config = settings(
        release, tmp_path / "run", train_file=str(train_file), dev_file=str(dev_file), test_file=str(test_file)
    )
    assert config.task == "reviews"  # named by the file
    result = train(config, progress=False)
    run = tmp_path / "run"
    assert result["task"] == "reviews" and result["labels"] == ["neg", "pos"] and result["metrics"] == ["accuracy"]
    assert result["train_examples"] == 24 and set(result["dev"]) == {"reviews"}
    assert result["predictions"] == ["reviews.tsv"]
    got = predictions(run / "predictions" / "reviews.tsv")
    assert [i for i, _ in got] == [f"t{i}" for i in range(5)] and {p for _, p in got} <= {"neg", "pos"}
    info = json.loads((run / "model" / "finetune.json").read_text())
    assert info["labels"] == ["neg", "pos"] and info["text_field"] == "text"
    # `predict` from the saved model writes the same file again.
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "model"),
                "--test-file",
                str(test_file),
                "--out-dir",
                str(tmp_path / "p"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert (tmp_path / "p" / "reviews.tsv").read_text() == (run / "predictions" / "reviews.tsv").read_text()


def test_integer_labels_sorted_by_value_pairs_and_line_number_ids(release, tmp_path):
    records = [{"q": review(i, i % 3 == 0), "a": review(i + 1, i % 3 != 0), "y": (10, 2, 1)[i % 3]} for i in range(18)]
    train_file = write_rows(tmp_path / "nli.tsv", records)
    test_file = write_rows(tmp_path / "new.jsonl", [{"q": "good", "a": "bad"}, {"q": "dull", "a": "fine"}])
    config = settings(
        release,
        tmp_path / "run",
        train_file=str(train_file),
        dev_size=6,
        test_file=str(test_file),
        text_field="q",
        text_pair_field="a",
        label_field="y",
        task="nli",
    )
    task = file_task(config)
    assert task.labels == ("1", "2", "10") and task.is_pair  # by value, not "1" < "10" < "2"
    dev = read_split(task, task.evals[0].dev)
    assert len(dev) == 6 and dev.text_b is not None and all(i.isdigit() for i in dev.index)  # ids: line numbers
    train(config, progress=False)
    got = predictions(tmp_path / "run" / "predictions" / "nli.tsv")
    assert [i for i, _ in got] == ["1", "2"] and {p for _, p in got} <= {"1", "2", "10"}


def test_regression_from_a_csv(release, tmp_path):
    records = [{"text": review(i, i % 2 == 0), "score": f"{(i % 5) * 0.7:.2f}"} for i in range(16)]
    train_file = write_rows(tmp_path / "scores.csv", records)
    test_file = write_rows(tmp_path / "unscored.csv", [{"text": review(i, True)} for i in range(3)])
    config = settings(
        release,
        tmp_path / "run",
        train_file=str(train_file),
        dev_size=4,
        test_file=str(test_file),
        label_field="score",
        problem="regression",
    )
    result = train(config, progress=False)
    assert result["labels"] is None and result["metrics"] == ["pearson", "spearman"]
    got = predictions(tmp_path / "run" / "predictions" / "scores.tsv")
    assert [i for i, _ in got] == ["2", "3", "4"]  # csv rows start at line 2 (the header is line 1)
    assert all(abs(float(p)) < 1e6 for _, p in got)


# ---- the dev split and the fixed subset ----------------------------------------------------------------


def test_dev_split_is_fixed_disjoint_and_follows_ids(release, tmp_path):
    records = rows(200)
    path = write_rows(tmp_path / "a.jsonl", records)
    shuffled = write_rows(tmp_path / "b.jsonl", records[::-1])  # the same rows, another order

    def parts(file: Path, seed: int, **kw):
        task = file_task(settings(release, tmp_path / "o", train_file=str(file), dev_size=30, seed=seed, **kw))
        return read_split(task, task.train).index, read_split(task, task.evals[0].dev).index

    train_ids, dev_ids = parts(path, 0)
    assert len(dev_ids) == 30 and len(train_ids) == 170
    assert not set(train_ids) & set(dev_ids) and set(train_ids) | set(dev_ids) == {r["id"] for r in records}
    assert parts(path, 1) == (train_ids, dev_ids)  # seed-independent
    assert set(parts(shuffled, 0)[1]) == set(dev_ids)  # chosen by id, not by position
    # Without ids (--id-field names a column that is not an id here: "other" is "x" everywhere would tie,
    # so drop the id column instead): the line number decides, and reordering the file changes the split.
    plain = write_rows(tmp_path / "c.csv", [{"text": r["text"], "label": r["label"]} for r in records])
    train_lines, dev_lines = parts(plain, 0)
    assert len(dev_lines) == 30 and not set(train_lines) & set(dev_lines)
    assert parts(plain, 3) == (train_lines, dev_lines)


def test_fixed_subset_is_seed_independent_and_nested(release, tmp_path):
    path = write_rows(tmp_path / "a.jsonl", rows(300))
    task = file_task(settings(release, tmp_path / "o", train_file=str(path), dev_size=50))
    examples = read_split(task, task.train)
    small, large = fixed_subset(examples, 20), fixed_subset(examples, 80)
    assert len(small) == 20 and len(large) == 80 and set(small.index) < set(large.index)
    assert fixed_subset(examples, 20).index == small.index
    runs = [
        train(
            settings(
                release,
                tmp_path / f"r{seed}",
                train_file=str(path),
                dev_size=50,
                max_train_examples=20,
                seed=seed,
                save_model=False,
            ),
            progress=False,
        )
        for seed in (0, 1)
    ]
    assert [r["train_examples"] for r in runs] == [20, 20]


# ---- long inputs -----------------------------------------------------------------------------------------


def test_windows_are_pooled_per_document(release, tmp_path):
    long_text = " ".join(review(i, True, 12) for i in range(6))  # well over 32 tokens
    path = write_rows(tmp_path / "long.jsonl", [{"text": long_text, "label": 1}, {"text": "bad", "label": 0}])
    task = file_task(settings(release, tmp_path / "o", train_file=str(path), dev_file=str(path)))
    examples = read_file(task, task.evals[0].dev)
    torch.manual_seed(0)
    runner = load(release, 2, from_scratch=True, device="cpu", long_inputs="windows", window_stride=20)
    data = runner.encode(examples)
    windows = (data.documents == 0).sum().item()
    assert windows > 2 and (data.documents == 1).sum().item() == 1 and data.num_documents == 2
    assert data.document_labels.tolist() == [1, 0] and max(data.lengths) == 32
    # Consecutive windows overlap by window - stride tokens (30 text tokens a window, a stride of 20).
    assert data.ids(0)[1 + 20 : 31].tolist() == data.ids(1)[1:11].tolist()
    runner.model.eval()
    with torch.no_grad():
        probs = torch.cat(
            [runner.model(torch.from_numpy(data.ids(r)).long()[None]).logits.softmax(-1) for r in range(len(data))]
        )
    expected = [probs[:windows].mean(0).argmax().item(), probs[windows].argmax().item()]
    assert runner.predict(data, batch_size=3).tolist() == expected
    # Truncation (the default) gives one row per document, of at most 32 tokens.
    truncated = load(release, 2, from_scratch=True, device="cpu").encode(examples)
    assert len(truncated) == 2 and truncated.documents is None


def test_training_on_windows(release, tmp_path):
    records = [{"text": " ".join([review(i, i % 2 == 1, 12)] * 4), "label": i % 2} for i in range(12)]
    path = write_rows(tmp_path / "long.jsonl", records)
    config = settings(
        release, tmp_path / "run", train_file=str(path), dev_size=4, test_file=str(path), long_inputs="windows"
    )
    result = train(config, progress=False)
    assert result["train_examples"] == 8 and len(predictions(tmp_path / "run" / "predictions" / "long.tsv")) == 12
    assert json.loads((tmp_path / "run" / "model" / "finetune.json").read_text())["long_inputs"] == "windows"


# ---- beyond the release's length -------------------------------------------------------------------------


def test_a_128_release_fine_tunes_at_256_with_extended_positions(tokenizer, tmp_path):
    release = make_release(tmp_path / "r128", "hypermixer", tokenizer, max_seq_len=128, hypermixer_position="learned")
    original = load_file(str(release / "model.safetensors"))
    records = [{"text": " ".join([review(i, i % 2 == 1, 14)] * 20), "label": i % 2} for i in range(6)]
    path = write_rows(tmp_path / "long.jsonl", records)
    base = dict(train_file=str(path), dev_size=2, from_scratch=False, max_seq_len=256, batch_size=2)
    with pytest.raises(FinetuneError, match="exceeds the release's max_seq_len 128 .*--extend-positions copy"):
        train(settings(release, tmp_path / "refused", **base), progress=False)
    assert not (tmp_path / "refused").exists()  # nothing left that looks like a run
    # copy: the first 128 positions keep the release's values, the next 128 repeat them.
    runner = load(release, 2, max_seq_len=256, device="cpu", extend_positions="copy")
    state = runner.model.state_dict()
    for name in ("encoder.embeddings.position.weight", "encoder.blocks.0.mixer.position_table"):
        old = original[name]
        assert state[name].shape == (256, old.shape[1])
        assert torch.equal(state[name][:128], old) and torch.equal(state[name][128:], old)
    task = file_task(settings(release, tmp_path / "o", **base))
    assert max(runner.encode(read_split(task, task.train)).lengths) == 256  # the inputs use the new length
    result = train(settings(release, tmp_path / "run", extend_positions="copy", **base), progress=False)
    assert result["config"]["max_seq_len"] == 256 and len(result["history"]) == 1
    saved = ForSequenceClassification.from_pretrained(tmp_path / "run" / "model", num_labels=2)
    assert saved.config.max_seq_len == 256
    assert saved.state_dict()["encoder.embeddings.position.weight"].shape == (256, original[name].shape[1])


def test_extension_covers_every_position_table_and_interpolates():
    from hypermixer import EncoderConfig

    shape = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_seq_len=8)
    for mixer in ("hypermixer", "transformer", "fnet"):
        model = ForSequenceClassification(EncoderConfig(mixer=mixer, hypermixer_position="learned", **shape), 2)
        before = model.encoder.embeddings.position.weight.detach().clone()
        names = extend_positions(model, 20, "interpolate")
        assert model.config.max_seq_len == 20 and "encoder.embeddings.position.weight" in names
        after = model.encoder.embeddings.position.weight
        assert torch.allclose(after[0], before[0]) and torch.allclose(after[-1], before[-1])
        model(torch.ones(2, 20, dtype=torch.long))  # every position-dependent weight covers 20 now
    mlp = ForMaskedLM(EncoderConfig(mixer="mlpmixer", **shape))
    with pytest.raises(FinetuneError, match="mlpmixer's token-mixing weights are sized by its max_seq_len 8"):
        extend_positions(mlp, 16, "copy")


# ---- bad input: one line each, nothing left behind ---------------------------------------------------------


def test_bad_inputs_give_one_line_and_leave_no_run(release, tmp_path, capsys):
    good = write_rows(tmp_path / "good.jsonl", rows(12))
    missing = write_rows(tmp_path / "cols.csv", rows(6), columns=["id", "review", "label"])
    unseen = write_rows(tmp_path / "dev.jsonl", rows(3) + [{"id": "z", "text": "fine", "label": "neutral"}])
    mixed = write_rows(tmp_path / "mixed.jsonl", rows(3, labels=(0, 1)) + rows(2, start=3))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": \n')
    out = tmp_path / "run"
    base = ["train", "--release", str(release), "--output-dir", str(out), "--device", "cpu"]
    cases = [
        (
            ["--train-file", str(missing), "--dev-size", "2"],
            f"{missing}: no column 'text' (the file has: id, review, label)",
        ),
        (
            ["--train-file", str(good), "--dev-file", str(unseen)],
            f'{unseen}:4: label "neutral" was not seen in training (the training labels: neg, pos)',
        ),
        (
            ["--train-file", str(mixed), "--dev-size", "1"],
            f'{mixed}:4: label "pos" is a string, but the label at line 1 (0) is an integer; a label column holds one type',
        ),
        (["--train-file", str(broken), "--dev-size", "1"], f"{broken}:2: not valid JSON"),
        (
            ["--train-file", str(good), "--dev-size", "2", "--max-seq-len", "64"],
            "max_seq_len 64 exceeds the release's max_seq_len 32",
        ),
        (["--train-file", str(good)], "give a dev set: --dev-file FILE, or --dev-size N"),
        (
            ["--train-file", str(good), "--dev-size", "2", "--test-file", str(missing)],
            f"{missing}: no column 'text' (the file has: id, review, label)",
        ),
        (["--train-file", str(tmp_path / "x.parquet"), "--dev-size", "2"], "x.parquet: no such file"),
        (["--train-file", str(good), "--dev-size", "12"], "--dev-size 12 leaves no training rows (the file has 12)"),
        (
            ["--train-file", str(good), "--dev-size", "2", "--window-stride", "4"],
            "--window-stride needs --long-inputs windows",
        ),
    ]
    for argv, message in cases:
        assert main(base + argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists(), argv
    # A label missing in one line of a jsonl file: that line, and the fields it has.
    holey = write_rows(tmp_path / "holey.jsonl", rows(3) + [{"id": "q", "text": "fine"}])
    assert main(base + ["--train-file", str(holey), "--dev-size", "1"]) == 2
    assert f"{holey}:4: no field 'label' (the line has: id, text)" in capsys.readouterr().err


# ---- sweeps ---------------------------------------------------------------------------------------------------


def test_sweep_on_a_file_task(release, tmp_path, capsys):
    path = write_rows(tmp_path / "data" / "train.jsonl.gz", rows(16))
    sweep = tmp_path / "sweep"
    argv = ["sweep", "--sweep-dir", str(sweep), "--release", str(release), "--init", "scratch", "--lrs", "1e-3"]
    argv += ["--seeds", "0,1", "--train-file", str(path), "--dev-size", "4", "--epochs", "1", "--batch-sizes", "4"]
    assert main(argv + ["--device", "cpu", "--no-save-model"]) == 0
    summary = aggregate(sweep)
    entry = summary["models"]["hm-scratch"]["tasks"]["data"]  # train.jsonl.gz in data/: the task "data"
    assert entry["runs"] == 2 and entry["metrics"] == ["accuracy"]
    assert summary["models"]["hm-scratch"]["glue_score"]["median"] is None
    assert "| Model | data | GLUE |" in (sweep / "results.md").read_text()
    capsys.readouterr()
    specs = plan_sweep(sweep, [str(release)], "imdb", [1e-3], [0], [4], ["scratch"], train_file=str(path), dev_size=4)
    assert specs[0].task == "imdb" and specs[0].name == "hm-scratch--imdb--lr0.001--bs4--seed0"


# ---- the worked example's data -----------------------------------------------------------------------------


@pytest.mark.skipif(not IMDB.is_file(), reason=f"{IMDB} not present (../shared holds the real data)")
def test_imdb_dev_split_of_2500(release, tmp_path):
    config = settings(release, tmp_path / "o", train_file=str(IMDB), dev_size=2500, id_field="id", task="imdb")
    task = file_task(config)
    train_part, dev = read_split(task, task.train), read_split(task, task.evals[0].dev)
    assert (len(train_part), len(dev)) == (22500, 2500) and task.labels == ("0", "1")
    assert not set(train_part.index) & set(dev.index)
    assert 1100 < sum(dev.labels) < 1400  # the split is not ordered by label (the file is)
