"""finetune: GLUE tasks, loaders and their quirks, metrics, training, sweeps, submission files, CLI.

Everything runs on small GLUE-format fixtures written here and tiny models; one test fine-tunes on
the real SST-2 from ../shared/data (skipped when it is absent).
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from common.files import sha256_file
from common.optim import lr_scheduler
from data_pipeline.tokenizer import train_tokenizer
from finetune import metrics
from finetune.__main__ import main
from finetune.config import FinetuneConfig
from finetune.data import read_split
from finetune.errors import FinetuneError
from finetune.model import load
from finetune.submission import SUBMISSION_FILES, write_submission
from finetune.sweep import load_plan, plan_sweep, run_one, run_sweep
from finetune.tasks import GLUE_TASKS, TASKS, get_task, parse_tasks
from finetune.trainer import make_optimizer, train
from hypermixer import MIXERS, EncoderConfig, ForMaskedLM, ForSequenceClassification, read_release_config

REPO = Path(__file__).resolve().parents[1]
SHARED_SST2 = REPO.parent / "shared" / "data" / "glue" / "SST-2"

# ---- fixtures: a GLUE folder in the real layouts, quirks included ---------------------------------

WORDS = (
    "the a good bad great awful movie film plot actor fun boring why what how is are was man woman "
    "dog cat runs sleeps question answer city river blue red slow fast"
).split()


def sentence(i: int, n: int = 6) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(n + i % 4))


def write(path: Path, lines: list[str], bom: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(("\ufeff" if bom else "") + "\n".join(lines) + "\n", encoding="utf-8")


MNLI_TRAIN_HEAD = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEAD = MNLI_TRAIN_HEAD[:11] + ["label2", "label3", "label4", "label5", "gold_label"]
MNLI_TEST_HEAD = MNLI_TRAIN_HEAD[:10]
NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")


def write_glue(root: Path, n: int = 10) -> Path:
    """n labelled rows per train/dev file and 3-4 test rows per task, each in its task's own layout."""
    rows = range(n)
    tab = "\t".join
    # CoLA: train/dev without header (source, label, original mark, sentence); a sentence may start with a quote.
    for split in ("train", "dev"):
        lines = [tab(["gj04", str(i % 2), "" if i % 2 else "*", sentence(i)]) for i in rows]
        lines[1] = tab(["gj04", "1", "", '"Good," she said, "very good."'])
        write(root / "CoLA" / f"{split}.tsv", lines)
    write(root / "CoLA" / "test.tsv", ["index\tsentence"] + [f"{i}\t{sentence(i + 50)}" for i in range(3)])
    # SST-2, one sentence with a stray carriage return (as in some copies).
    for split in ("train", "dev"):
        lines = ["sentence\tlabel"] + [f"{sentence(i)}\t{i % 2}" for i in rows]
        lines[2] = f"{sentence(1)} \r\t1"
        write(root / "SST-2" / f"{split}.tsv", lines)
    write(root / "SST-2" / "test.tsv", ["index\tsentence"] + [f"{i}\t{sentence(i + 50)}" for i in range(3)])
    # MRPC: byte-order mark, label first, ids in between.
    for split in ("train", "dev"):
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        lines += [tab([str(i % 2), str(1000 + i), str(2000 + i), sentence(i), sentence(i + 1)]) for i in rows]
        write(root / "MRPC" / f"{split}.tsv", lines, bom=True)
    write(
        root / "MRPC" / "test.tsv",
        ["index\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        + [tab([str(i), "1", "2", sentence(i), sentence(i + 2)]) for i in range(3)],
    )
    # STS-B: ten columns, float score last.
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    for split in ("train", "dev"):
        lines = [head + "\tscore"] + [
            tab(
                [
                    str(i),
                    "main-captions",
                    "MSRvid",
                    "2012test",
                    f"{i:04d}",
                    "none",
                    "none",
                    sentence(i),
                    sentence(i + 3),
                    f"{(i * 0.55) % 5:.3f}",
                ]
            )
            for i in rows
        ]
        write(root / "STS-B" / f"{split}.tsv", lines)
    write(
        root / "STS-B" / "test.tsv",
        [head] + [tab([str(i), "g", "f", "y", "o", "s", "s", sentence(i), sentence(i + 1)]) for i in range(3)],
    )
    # QQP: malformed rows (a question broken over two lines, a row missing its label) are skipped.
    for split in ("train", "dev"):
        lines = ["id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"]
        lines += [tab([str(i), str(2 * i), str(2 * i + 1), sentence(i), sentence(i + 5), str(i % 2)]) for i in rows]
        lines[3:3] = ["77\t154\t155\twhy is the sky", "blue\twhat is blue\t0", "78\t156\t157\tonly one question"]
        write(root / "QQP" / f"{split}.tsv", lines)
    write(
        root / "QQP" / "test.tsv",
        ["id\tquestion1\tquestion2"] + [f"{i}\t{sentence(i)}\t{sentence(i + 1)}" for i in range(4)],
    )

    # MNLI: 12 columns in train, 16 in dev (gold_label last), 10 in test; matched and mismatched.
    def mnli(head, i, labelled):
        values = [str(i), "p", "q", "fiction", "(bp)", "(bp)", "(p)", "(p)", sentence(i), sentence(i + 4)]
        return tab(values + (["neutral"] * (len(head) - 11) + [NLI3[i % 3]] if labelled else []))

    write(root / "MNLI" / "train.tsv", [tab(MNLI_TRAIN_HEAD)] + [mnli(MNLI_TRAIN_HEAD, i, True) for i in rows])
    for kind in ("matched", "mismatched"):
        write(root / "MNLI" / f"dev_{kind}.tsv", [tab(MNLI_DEV_HEAD)] + [mnli(MNLI_DEV_HEAD, i, True) for i in rows])
        write(
            root / "MNLI" / f"test_{kind}.tsv",
            [tab(MNLI_TEST_HEAD)] + [mnli(MNLI_TEST_HEAD, i, False) for i in range(3)],
        )
    # QNLI, RTE, WNLI: index, two texts, label.
    for name, head, labels in (
        ("QNLI", "index\tquestion\tsentence", NLI2),
        ("RTE", "index\tsentence1\tsentence2", NLI2),
        ("WNLI", "index\tsentence1\tsentence2", ("0", "1")),
    ):
        for split in ("train", "dev"):
            write(
                root / name / f"{split}.tsv",
                [head + "\tlabel"] + [tab([str(i), sentence(i), sentence(i + 2), labels[i % 2]]) for i in rows],
            )
        write(root / name / "test.tsv", [head] + [tab([str(i), sentence(i), sentence(i + 1)]) for i in range(3)])
    # AX, where download_glue_data.py puts it.
    write(
        root / "diagnostic" / "diagnostic.tsv",
        ["index\tsentence1\tsentence2"] + [tab([str(i), sentence(i), sentence(i + 1)]) for i in range(4)],
    )
    return root


def make_tokenizer(texts):
    return train_tokenizer(texts, vocab_size=300, min_frequency=1)


def make_release(folder: Path, mixer: str, tokenizer, max_seq_len: int = 32, **overrides) -> Path:
    """What pretrain.export writes (config.json, model.safetensors, tokenizer.json), freshly initialised."""
    torch.manual_seed(0)
    shape = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    config = EncoderConfig(
        vocab_size=tokenizer.get_vocab_size(), mixer=mixer, max_seq_len=max_seq_len, **{**shape, **overrides}
    )
    ForMaskedLM(config).save_pretrained(folder)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def glue(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer([sentence(i) for i in range(60)] + ["good she said very", "why sky blue only one"])


@pytest.fixture(scope="module")
def releases(tmp_path_factory, tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("releases")
    return {mixer: make_release(root / mixer, mixer, tokenizer) for mixer in MIXERS}


def quick(release, task, output_dir, glue_dir, **kw) -> FinetuneConfig:
    settings = dict(epochs=1, batch_size=4, learning_rate=1e-3, device="cpu", eval_batch_size=8)
    return FinetuneConfig(
        release=str(release), task=task, output_dir=str(output_dir), glue_dir=str(glue_dir), **{**settings, **kw}
    )


# ---- tasks and metrics ------------------------------------------------------------------------------


def test_task_table():
    assert GLUE_TASKS == ("CoLA", "SST-2", "MRPC", "STS-B", "QQP", "MNLI", "QNLI", "RTE", "WNLI")
    assert sorted(SUBMISSION_FILES) == sorted(
        [
            "CoLA.tsv",
            "SST-2.tsv",
            "MRPC.tsv",
            "STS-B.tsv",
            "QQP.tsv",
            "MNLI-m.tsv",
            "MNLI-mm.tsv",
            "QNLI.tsv",
            "RTE.tsv",
            "WNLI.tsv",
            "AX.tsv",
        ]
    )
    assert get_task("sst2").name == "SST-2" and get_task("sts-b").name == "STS-B" and get_task("mnli").name == "MNLI"
    assert TASKS["STS-B"].num_labels == 1 and TASKS["MNLI"].num_labels == 3 and TASKS["RTE"].labels == NLI2
    assert parse_tasks("all") == list(GLUE_TASKS)
    assert parse_tasks("rte,CoLA") == ["CoLA", "RTE"]  # GLUE order
    with pytest.raises(FinetuneError, match="unknown task 'SST-5'"):
        get_task("SST-5")
    with pytest.raises(FinetuneError, match="AX has no training data"):
        parse_tasks("AX")


def test_metrics_known_values():
    # scikit-learn's documented MCC example: -1/3.
    assert metrics.compute(["mcc"], [1, 1, 1, 0], [1, 0, 1, 1])["mcc"] == pytest.approx(-1 / 3)
    # TP=2, FP=1, FN=1: F1 = 4/6; 3 of 5 right.
    got = metrics.compute(["f1", "accuracy"], [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert got == pytest.approx({"f1": 2 / 3, "accuracy": 0.6})
    # Pearson 6/sqrt(60); Spearman on ranks [1, 2.5, 4.5, 2.5, 4.5] (ties share their mean rank): 7/sqrt(90).
    got = metrics.compute(["pearson", "spearman"], [1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    assert got == pytest.approx({"pearson": 6 / 60**0.5, "spearman": 7 / 90**0.5})
    assert metrics.compute(["pearson", "spearman"], [1.0, 2.0, 3.0], [2.5, 2.5, 2.5]) == {
        "pearson": 0.0,
        "spearman": 0.0,
    }
    assert metrics.compute(["mcc"], [0, 1, 1], [1, 1, 1])["mcc"] == 0.0
    with pytest.raises(FinetuneError, match="unknown metric 'bleu'"):
        metrics.compute(["bleu"], [1], [1])


def test_glue_score_as_the_leaderboard_computes_it():
    # BERT-base's GLUE test results (leaderboard score 78.3): MNLI counts once, as the mean of m and mm.
    bert_base = {
        "CoLA": {"CoLA": {"mcc": 0.521}},
        "SST-2": {"SST-2": {"accuracy": 0.935}},
        "MRPC": {"MRPC": {"f1": 0.889, "accuracy": 0.848}},
        "STS-B": {"STS-B": {"pearson": 0.871, "spearman": 0.858}},
        "QQP": {"QQP": {"f1": 0.712, "accuracy": 0.892}},
        "MNLI": {"MNLI-m": {"accuracy": 0.846}, "MNLI-mm": {"accuracy": 0.834}},
        "QNLI": {"QNLI": {"accuracy": 0.905}},
        "RTE": {"RTE": {"accuracy": 0.664}},
        "WNLI": {"WNLI": {"accuracy": 0.651}},
    }
    scores = {task: metrics.task_score(dev) for task, dev in bert_base.items()}
    assert scores["MRPC"] == pytest.approx((0.889 + 0.848) / 2) and scores["MNLI"] == pytest.approx(0.84)
    assert round(100 * metrics.glue_score(scores), 1) == 78.3
    del scores["WNLI"]
    assert metrics.glue_score(scores) is None


# ---- loaders ------------------------------------------------------------------------------------------


def test_every_task_loads_from_the_glue_layout(glue, capsys):
    for name in GLUE_TASKS:
        task = TASKS[name]
        train_split = read_split(task, task.train, glue_dir=glue)
        assert len(train_split) == 10, name
        assert (train_split.text_b is None) == (not task.is_pair)
        for ev in task.evals:
            dev = read_split(task, ev.dev, glue_dir=glue)
            test = read_split(task, ev.test, glue_dir=glue)
            assert len(dev) == 10 and dev.labels is not None and test.labels is None
            assert test.index[:3] == ["0", "1", "2"]
    cola = read_split(TASKS["CoLA"], TASKS["CoLA"].train, glue_dir=glue)
    assert cola.labels[:3] == [0, 1, 0] and cola.text_a[1] == '"Good," she said, "very good."'
    sst = read_split(TASKS["SST-2"], TASKS["SST-2"].train, glue_dir=glue)
    assert sst.labels[1] == 1 and sst.text_a[1] == sentence(1) + "  "  # the stray carriage return became a space
    mrpc = read_split(TASKS["MRPC"], TASKS["MRPC"].train, glue_dir=glue)
    assert mrpc.labels[:2] == [0, 1] and mrpc.text_b[0] == sentence(1)
    stsb = read_split(TASKS["STS-B"], TASKS["STS-B"].train, glue_dir=glue)
    assert stsb.labels[:3] == pytest.approx([0.0, 0.55, 1.1]) and stsb.text_a[0] == sentence(0)
    mnli = read_split(TASKS["MNLI"], TASKS["MNLI"].evals[1].dev, glue_dir=glue)
    assert mnli.labels[:3] == [0, 1, 2] and mnli.text_b[0] == sentence(4)
    assert read_split(TASKS["RTE"], TASKS["RTE"].train, glue_dir=glue).labels[:2] == [0, 1]
    ax = read_split(TASKS["AX"], TASKS["AX"].evals[0].test, glue_dir=glue)
    assert len(ax) == 4 and ax.labels is None


def test_qqp_malformed_rows_are_skipped_and_counted(glue, capsys):
    qqp = read_split(TASKS["QQP"], TASKS["QQP"].train, glue_dir=glue)
    assert len(qqp) == 10 and qqp.skipped == 3
    assert "skipped 3 malformed rows" in capsys.readouterr().err
    assert read_split(TASKS["QQP"], TASKS["QQP"].evals[0].test, glue_dir=glue).index == ["0", "1", "2", "3"]


@pytest.mark.parametrize(
    "task, split, lines, message",
    [
        ("CoLA", "train", ["gj04\tx\t\tA sentence."], "CoLA/train.tsv:1: label 'x' is not one of 0, 1"),
        ("SST-2", "dev", ["sentence\tlabel", "fine\t1", "bad\t2"], "SST-2/dev.tsv:3: label '2' is not one of 0, 1"),
        (
            "RTE",
            "train",
            ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tneutral"],
            "RTE/train.tsv:2: label 'neutral' is not one of entailment, not_entailment",
        ),
        (
            "STS-B",
            "train",
            [
                "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore",
                "0\tg\tf\ty\to\ts\ts\ta\tb\t7.5",
            ],
            "STS-B/train.tsv:2: label '7.5' is not a score in [0, 5]",
        ),
        (
            "SST-2",
            "train",
            ["sentence\tlabel", "no label here"],
            "SST-2/train.tsv:2: expected at least 2 tab-separated fields, found 1",
        ),
        (
            "SST-2",
            "train",
            ["text\tlabel", "fine\t1"],
            "SST-2/train.tsv:1: no column 'sentence' in the header (found: text, label)",
        ),
        ("SST-2", "train", ["sentence\tlabel"], "SST-2/train.tsv: no examples"),
    ],
)
def test_bad_data_gives_one_clear_error(tmp_path, task, split, lines, message):
    write(tmp_path / task / f"{split}.tsv", lines)
    t = TASKS[task]
    with pytest.raises(FinetuneError) as err:
        read_split(t, t.train if split == "train" else t.evals[0].dev, glue_dir=tmp_path)
    assert str(err.value).endswith(message) and "\n" not in str(err.value)


def test_missing_file_error(tmp_path):
    with pytest.raises(FinetuneError, match=r"MNLI/dev_matched.tsv: no such file"):
        read_split(TASKS["MNLI"], TASKS["MNLI"].evals[0].dev, glue_dir=tmp_path)


def _hf_copy(root: Path) -> Path:
    """A local copy of three `glue` configs as `datasets` writes them (save_to_disk), HF column names and ClassLabels."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    def split(cfg, n, labelled, text=("sentence1", "sentence2")):
        label = ClassLabel(names=list(cfg)) if cfg else Value("float32")
        feats = Features({text[0]: Value("string"), text[1]: Value("string"), "label": label, "idx": Value("int32")})
        rows = {
            text[0]: [sentence(i) for i in range(n)],
            text[1]: [sentence(i + 1) for i in range(n)],
            "label": [(i % len(cfg) if cfg else i * 0.4) if labelled else -1 for i in range(n)],
            "idx": list(range(n)),
        }
        return Dataset.from_dict(rows, features=feats)

    DatasetDict(train=split(NLI2, 12, True), validation=split(NLI2, 6, True), test=split(NLI2, 5, False)).save_to_disk(
        root / "rte"
    )
    DatasetDict(train=split(None, 8, True), validation=split(None, 6, True)).save_to_disk(root / "stsb")
    nli = ("premise", "hypothesis")
    DatasetDict(
        train=split(NLI3, 9, True, nli),
        validation_matched=split(NLI3, 6, True, nli),
        validation_mismatched=split(NLI3, 3, True, nli),
        test_matched=split(NLI3, 2, False, nli),
        test_mismatched=split(NLI3, 2, False, nli),
    ).save_to_disk(root / "mnli")
    return root


@pytest.fixture(scope="module")
def hf_glue(tmp_path_factory) -> Path:
    return _hf_copy(tmp_path_factory.mktemp("hf"))


def test_hugging_face_datasets_local_copy_and_hub_path(hf_glue, monkeypatch):
    rte = TASKS["RTE"]
    train_split = read_split(rte, rte.train, hf_dataset=str(hf_glue))
    assert len(train_split) == 12 and train_split.labels[:3] == [0, 1, 0] and train_split.text_b[0] == sentence(1)
    test = read_split(rte, rte.evals[0].test, hf_dataset=str(hf_glue))
    assert test.labels is None and test.index == ["0", "1", "2", "3", "4"]
    assert read_split(TASKS["STS-B"], TASKS["STS-B"].train, hf_dataset=str(hf_glue)).labels[1] == pytest.approx(0.4)
    mm = read_split(TASKS["MNLI"], TASKS["MNLI"].evals[1].dev, hf_dataset=str(hf_glue))
    assert len(mm) == 3 and mm.labels == [0, 1, 2]
    # A task's own DatasetDict folder works too.
    assert len(read_split(rte, rte.evals[0].dev, hf_dataset=str(hf_glue / "rte"))) == 6
    with pytest.raises(FinetuneError, match="not a `datasets` folder"):
        read_split(TASKS["CoLA"], TASKS["CoLA"].train, hf_dataset=str(hf_glue))
    # The hub path: datasets.load_dataset("nyu-mll/glue", <config>, split=...), served from the local copy here.
    import datasets

    calls = []

    def offline_hub(name, config, split):
        calls.append((name, config, split))
        return datasets.load_from_disk(str(hf_glue / config))[split]

    monkeypatch.setattr(datasets, "load_dataset", offline_hub)
    assert len(read_split(TASKS["MNLI"], TASKS["MNLI"].evals[0].test, hf_dataset="nyu-mll/glue")) == 2
    assert calls == [("nyu-mll/glue", "mnli", "test_matched")]


def test_hf_label_outside_the_task_set(tmp_path):
    from datasets import Dataset, DatasetDict

    rows = {"sentence": ["a", "b"], "label": [1, 5], "idx": [0, 1]}
    DatasetDict(train=Dataset.from_dict(rows)).save_to_disk(tmp_path / "sst2")
    with pytest.raises(FinetuneError, match=r"sst2/train\] row 1: label 5 is not one of 0..1"):
        read_split(TASKS["SST-2"], TASKS["SST-2"].train, hf_dataset=str(tmp_path))


# ---- tokenisation, padding, model loading --------------------------------------------------------------


def test_pairs_get_segments_and_truncation(releases, glue):
    runner = load(releases["hypermixer"], 2, max_seq_len=12)
    data = runner.encode(read_split(TASKS["RTE"], TASKS["RTE"].train, glue_dir=glue))
    cls, sep = runner.tokenizer.token_to_id("[CLS]"), runner.tokenizer.token_to_id("[SEP]")
    ids, types = data.ids(0).tolist(), data.type_ids(0).tolist()
    assert len(ids) <= 12 and ids[0] == cls and ids[-1] == sep and ids.count(sep) == 2
    first_sep = ids.index(sep)
    assert types == [0] * (first_sep + 1) + [1] * (len(ids) - first_sep - 1)
    assert data.lengths.max() == 12  # the longer pairs were truncated
    with pytest.raises(FinetuneError, match="exceeds the release's max_seq_len 32"):
        load(releases["hypermixer"], 2, max_seq_len=64)


@pytest.mark.parametrize("mixer", MIXERS)
def test_predictions_do_not_depend_on_batch_padding(releases, glue, mixer):
    """Batches are padded to their longest row except for FNet (padded to max_seq_len): every mixer
    then predicts a row the same whatever else is in its batch."""
    runner = load(releases[mixer], 3, max_seq_len=32)
    data = runner.encode(read_split(TASKS["MNLI"], TASKS["MNLI"].train, glue_dir=glue))
    assert (runner.pad_to == 32) == (mixer == "fnet")
    runner.model.eval()
    with torch.no_grad():
        alone = torch.cat(
            [runner.model(**runner.inputs(b)).logits for _, b in runner.batches(data, 1, torch.arange(len(data)))]
        )
        together = torch.cat(
            [
                runner.model(**runner.inputs(b)).logits
                for _, b in runner.batches(data, len(data), torch.arange(len(data)))
            ]
        )
    torch.testing.assert_close(alone, together, rtol=1e-4, atol=1e-5)


def test_from_scratch_keeps_config_and_tokenizer_but_not_weights(releases):
    release = releases["transformer"]
    pretrained = ForMaskedLM.from_pretrained(release).encoder.state_dict()
    torch.manual_seed(1)
    loaded = load(release, 2).model.encoder.state_dict()
    torch.manual_seed(1)
    scratch = load(release, 2, from_scratch=True).model.encoder.state_dict()
    assert all(torch.equal(loaded[k], pretrained[k]) for k in pretrained)
    assert not torch.equal(scratch["embeddings.token.weight"], pretrained["embeddings.token.weight"])
    assert load(release, 2, from_scratch=True).tokenizer.get_vocab_size() == load(release, 2).tokenizer.get_vocab_size()


def test_no_weight_decay_on_biases_and_norms():
    model = ForSequenceClassification(
        EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_seq_len=8)
    )
    decay, no_decay = make_optimizer(model, 1e-3, 0.01, 1e-6).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert "encoder.blocks.0.mixer.hyper_w1.fc1_bias" in skipped and "encoder.final_norm.weight" in skipped
    assert all(n.endswith("bias") or "norm" in n for n in skipped)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_linear_warmup_then_decay():
    # The schedule pretraining uses too (common.optim): the first step already moves the weights.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_scheduler(optimizer, warmup=2, total=10)
    lrs = []
    for _ in range(10):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])


# ---- training, prediction, submission ------------------------------------------------------------------


@pytest.mark.parametrize("mixer", MIXERS)
def test_train_each_mixer_writes_a_complete_run(releases, glue, tmp_path, mixer):
    result = train(quick(releases[mixer], "MNLI", tmp_path / "run", glue, epochs=2), progress=False)
    run = tmp_path / "run"
    assert result["task"] == "MNLI" and set(result["dev"]) == {"MNLI-m", "MNLI-mm"}
    assert len(result["history"]) == 2 and result["best_epoch"] in (1, 2)
    assert result["score"] == max(h["score"] for h in result["history"])
    assert json.loads((run / "result.json").read_text())["score"] == result["score"]
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    # The best epoch's weights reload as a classifier that predicts what the run reported.
    model = ForSequenceClassification.from_pretrained(run / "model", num_labels=3)
    assert model.config.mixer == mixer and (run / "model" / "tokenizer.json").is_file()
    assert sorted(result["predictions"]) == ["AX.tsv", "MNLI-m.tsv", "MNLI-mm.tsv"]
    ax = (run / "predictions" / "AX.tsv").read_text().splitlines()
    assert ax[0] == "index\tprediction" and len(ax) == 5 and all(line.split("\t")[1] in NLI3 for line in ax[1:])


def test_training_is_seeded(releases, glue, tmp_path):
    runs = [
        train(
            quick(releases["hypermixer"], "STS-B", tmp_path / f"r{i}", glue, save_model=False, predict_test=False),
            progress=False,
        )
        for i in range(2)
    ]
    assert runs[0]["history"][0]["train_loss"] == runs[1]["history"][0]["train_loss"]
    assert runs[0]["dev"] == runs[1]["dev"]


def test_submission_files_and_zip(releases, glue, tmp_path):
    written = {}
    for task in GLUE_TASKS:
        result = train(quick(releases["hypermixer"], task, tmp_path / task, glue, save_model=False), progress=False)
        written.update({name: tmp_path / task / "predictions" / name for name in result["predictions"]})
    assert sorted(written) == sorted(SUBMISSION_FILES)
    expected_labels = {
        "CoLA.tsv": {"0", "1"},
        "SST-2.tsv": {"0", "1"},
        "MRPC.tsv": {"0", "1"},
        "QQP.tsv": {"0", "1"},
        "WNLI.tsv": {"0", "1"},
        "QNLI.tsv": set(NLI2),
        "RTE.tsv": set(NLI2),
        "MNLI-m.tsv": set(NLI3),
        "MNLI-mm.tsv": set(NLI3),
        "AX.tsv": set(NLI3),
    }
    for name, path in written.items():
        lines = path.read_text().splitlines()
        assert lines[0] == "index\tprediction"
        index, predictions = zip(*(line.split("\t") for line in lines[1:]))
        assert list(index) == [str(i) for i in range(len(index))]
        if name == "STS-B.tsv":
            assert all(0.0 <= float(p) <= 5.0 for p in predictions)
        else:
            assert set(predictions) <= expected_labels[name], name
    assert len(written["QQP.tsv"].read_text().splitlines()) == 5  # QQP's test ids come from its `id` column
    report = write_submission(list(written.values()), tmp_path / "submission.zip")
    assert report["missing"] == []
    assert report["unexpected_row_counts"]["RTE.tsv"] == {"rows": 3, "expected": 3000}
    with zipfile.ZipFile(tmp_path / "submission.zip") as archive:
        assert sorted(archive.namelist()) == sorted(SUBMISSION_FILES)
        assert archive.read("MNLI-mm.tsv").decode() == written["MNLI-mm.tsv"].read_text()
    # Refused: a name the server does not know, a label outside the task's set.
    bad = tmp_path / "bad"
    write(bad / "SST2.tsv", ["index\tprediction", "0\t1"])
    with pytest.raises(FinetuneError, match="SST2.tsv: not a GLUE submission file name"):
        write_submission([bad / "SST2.tsv"], tmp_path / "x.zip")
    write(bad / "RTE.tsv", ["index\tprediction", "0\t1"])
    with pytest.raises(FinetuneError, match=r"RTE.tsv:2: expected <index><TAB><one of entailment, not_entailment>"):
        write_submission([bad / "RTE.tsv"], tmp_path / "x.zip")


def test_cli_train_from_hf_copy_predict_and_submit(releases, hf_glue, tmp_path, capsys):
    run = tmp_path / "rte"
    assert (
        main(
            [
                "train",
                "--release",
                str(releases["transformer"]),
                "--task",
                "rte",
                "--hf",
                str(hf_glue),
                "--output-dir",
                str(run),
                "--epochs",
                "1",
                "--batch-size",
                "4",
                "--no-progress",
            ]
        )
        == 0
    )
    printed = json.loads(capsys.readouterr().out)
    assert printed["task"] == "RTE" and 0.0 <= printed["score"] <= 1.0
    assert (run / "predictions" / "RTE.tsv").read_text().count("\n") == 6
    assert main(["predict", "--model", str(run / "model"), "--hf", str(hf_glue), "--out-dir", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p" / "RTE.tsv").read_text() == (run / "predictions" / "RTE.tsv").read_text()
    capsys.readouterr()
    assert (
        main(
            [
                "predict",
                "--model",
                str(run / "model"),
                "--task",
                "MNLI",
                "--hf",
                str(hf_glue),
                "--out-dir",
                str(tmp_path / "p"),
            ]
        )
        == 2
    )
    assert "fine-tuned on RTE, not MNLI" in capsys.readouterr().err
    assert main(["submit", "--predictions", str(tmp_path / "p"), "--out", str(tmp_path / "s.zip")]) == 0
    assert "missing CoLA.tsv" in capsys.readouterr().err
    assert zipfile.ZipFile(tmp_path / "s.zip").namelist() == ["RTE.tsv"]


def test_cli_errors_exit_2_without_traceback(releases, glue, tmp_path, capsys):
    base = [
        "train",
        "--release",
        str(releases["hypermixer"]),
        "--output-dir",
        str(tmp_path / "o"),
        "--glue-dir",
        str(glue),
    ]
    cases = [
        (base + ["--task", "SST-5"], "finetune: error: unknown task 'SST-5' (choose from CoLA, SST-2"),
        (
            base + ["--task", "RTE", "--lr", "-1"],
            "finetune: error: invalid fine-tuning config: learning_rate: must be > 0, got -1.0 (--lr -1.0)",
        ),
        (
            ["train", "--release", str(tmp_path), "--task", "RTE", "--output-dir", "o", "--glue-dir", str(glue)],
            f"finetune: error: {tmp_path}/config.json: no such file",
        ),
        (
            [
                "train",
                "--release",
                str(releases["hypermixer"]),
                "--task",
                "RTE",
                "--output-dir",
                "o",
                "--glue-dir",
                str(tmp_path / "nope"),
            ],
            "no such folder (expected the GLUE layout",
        ),
        (["aggregate", "--sweep-dir", str(tmp_path)], "plan.json: no such file"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    # The module entry point, as users run it: one line on stderr, exit status 2.
    proc = subprocess.run(
        [sys.executable, "-m", "finetune", *base, "--task", "AX"], capture_output=True, text=True, cwd=REPO
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("finetune: error: task AX has no training data")
    assert "Traceback" not in proc.stderr
    help_text = subprocess.run(
        [sys.executable, "-m", "finetune", "sweep", "--help"], capture_output=True, text=True, cwd=REPO
    )
    assert help_text.returncode == 0 and "--lrs" in help_text.stdout and "--plan-only" in help_text.stdout


# ---- sweeps ---------------------------------------------------------------------------------------------


def test_sweep_plan_run_skip_aggregate_submit(releases, glue, tmp_path, capsys):
    sweep = tmp_path / "sweep"
    kwargs = dict(glue_dir=str(glue), epochs=1, device="cpu", eval_batch_size=8, save_model=False)
    specs = plan_sweep(
        sweep,
        [f"hm={releases['hypermixer']}"],
        "RTE,STS-B",
        [1e-3, 3e-4],
        [0, 1],
        [4],
        ["pretrained", "scratch"],
        **kwargs,
    )
    assert len(specs) == 16 and specs[0].name == "hm--STS-B--lr0.001--bs4--seed0"
    assert [s.name for s in specs] == [
        s.name
        for s in plan_sweep(
            sweep,
            [f"hm={releases['hypermixer']}"],
            "RTE,STS-B",
            [1e-3, 3e-4],
            [0, 1],
            [4],
            ["pretrained", "scratch"],
            **kwargs,
        )
    ]
    assert json.loads(json.dumps([s.to_dict() for s in specs])) == [s.to_dict() for s in load_plan(sweep)]
    assert {s.model for s in specs} == {"hm", "hm-scratch"} and specs[8].config["from_scratch"] is True
    with pytest.raises(FinetuneError, match="already planned with other settings \\(epochs\\)"):
        plan_sweep(sweep, [f"hm={releases['hypermixer']}"], "RTE", [1e-3], [0], [4], **{**kwargs, "epochs": 2})

    summary = run_sweep(sweep, progress=False)
    result_file = specs[0].output_dir / "result.json"
    stamp = result_file.stat().st_mtime_ns
    assert run_one(specs[0].to_dict())["score"] == json.loads(result_file.read_text())["score"]
    assert result_file.stat().st_mtime_ns == stamp  # done runs are skipped, not retrained
    assert "already done" in capsys.readouterr().out

    assert summary["runs_done"] == 16 and summary["missing_runs"] == []
    rte = summary["models"]["hm"]["tasks"]["RTE"]
    scores = {s.name: json.loads((s.output_dir / "result.json").read_text())["score"] for s in specs}
    for setting in rte["settings"]:
        lr = setting["learning_rate"]
        mine = [scores[f"hm--RTE--lr{lr:g}--bs4--seed{seed}"] for seed in (0, 1)]
        assert setting["score"] == pytest.approx(sum(mine) / 2)  # the median of two seeds
    assert rte["median"]["score"] == max(s["score"] for s in rte["settings"])
    assert rte["best"]["score"] == max(v for k, v in scores.items() if k.startswith("hm--RTE"))
    assert summary["models"]["hm"]["glue_score"] == {"median": None, "best": None}  # not all nine tasks
    table = (sweep / "results.md").read_text()
    assert "| Model | STS-B | RTE | GLUE |" in table and "| hm-scratch |" in table
    assert (sweep / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((sweep / "results.json").read_text())["runs_done"] == 16

    assert main(["submit", "--sweep-dir", str(sweep), "--model", "hm"]) == 0
    with zipfile.ZipFile(sweep / "submission.zip") as archive:
        assert sorted(archive.namelist()) == ["RTE.tsv", "STS-B.tsv"]
        best_run = sweep / "runs" / rte["best"]["run"] / "predictions" / "RTE.tsv"
        assert archive.read("RTE.tsv").decode() == best_run.read_text()
    assert main(["submit", "--sweep-dir", str(sweep)]) == 2  # two models: which one?


def test_sweep_refuses_a_run_finished_from_other_weights(glue, tokenizer, tmp_path):
    """A release exported again into the same folder is another model: its sweep's finished runs are not
    taken for runs from the new weights (nor are they silently trained over)."""
    release = make_release(tmp_path / "release", "hypermixer", tokenizer)
    kwargs = dict(glue_dir=str(glue), epochs=1, device="cpu", eval_batch_size=8, save_model=False)
    specs = plan_sweep(
        tmp_path / "sweep", [f"hm={release}"], "RTE", [1e-3], [0], [4], ["pretrained", "scratch"], **kwargs
    )
    pretrained, scratch = specs
    first = run_one(pretrained, progress=False)
    run_one(scratch, progress=False)
    assert first["release_sha256"] == sha256_file(release / "model.safetensors")
    assert json.loads((scratch.output_dir / "result.json").read_text())["release_sha256"] is None
    assert run_one(pretrained)["score"] == first["score"]  # the same weights: skipped

    torch.manual_seed(1)  # the release exported again: other weights in the same folder
    ForMaskedLM(read_release_config(release)["encoder"]).save_pretrained(release)
    with pytest.raises(FinetuneError, match=r"hm--RTE--lr0.001--bs4--seed0: finished from other weights than"):
        run_one(pretrained)
    run_one(scratch)  # from random weights: the release's weights play no part


def test_sweep_cli_plan_only_and_run_one_by_array_index(releases, glue, tmp_path, monkeypatch, capsys):
    sweep = tmp_path / "s"
    assert (
        main(
            [
                "sweep",
                "--sweep-dir",
                str(sweep),
                "--release",
                str(releases["fnet"]),
                "--tasks",
                "WNLI",
                "--lrs",
                "1e-3",
                "--seeds",
                "0,1",
                "--batch-sizes",
                "4",
                "--glue-dir",
                str(glue),
                "--epochs",
                "1",
                "--plan-only",
                "--no-save-model",
                "--no-predict",
            ]
        )
        == 0
    )
    specs = load_plan(sweep)
    assert [s.name for s in specs] == ["fnet--WNLI--lr0.001--bs4--seed0", "fnet--WNLI--lr0.001--bs4--seed1"]
    assert specs[0].config["save_model"] is False and specs[0].config["predict_test"] is False
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    assert main(["run-one", "--sweep-dir", str(sweep), "--no-progress"]) == 0
    assert (specs[1].output_dir / "result.json").is_file() and not specs[0].output_dir.exists()
    capsys.readouterr()
    assert main(["aggregate", "--sweep-dir", str(sweep)]) == 1  # one run still missing
    assert "1 of 2 planned runs done" in capsys.readouterr().out


# ---- the real SST-2 ---------------------------------------------------------------------------------------


@pytest.mark.skipif(
    not (SHARED_SST2 / "train.tsv").is_file(),
    reason=f"real SST-2 not found at {SHARED_SST2} (the shared data folder beside the repo)",
)
@pytest.mark.parametrize("mixer", ["hypermixer"])
def test_real_sst2_beats_the_majority_class(tmp_path, mixer):
    """A small hypermixer (d=64, 2 layers), random init, 125 steps on 4,000 training sentences; the
    majority class (positive) is 50.9%. Measured over fine-tuning seeds 0-4 on one machine: 66.7, 68.1,
    72.3, 69.6, 65.6% (mean 68.5, std 2.6); at lr 2e-3 the spread is wider (61.1-70.3%). A 125-step run
    from random weights depends on its first steps, and another CPU's float kernels perturb those as
    another seed would (64.7% on a Xeon against the old 65% bar). The bar sits 3 std below the mean."""
    sst2 = TASKS["SST-2"]
    texts = read_split(sst2, sst2.train, glue_dir=str(SHARED_SST2.parent)).text_a
    tokenizer = train_tokenizer(texts, vocab_size=4000, min_frequency=2)
    release = make_release(tmp_path / "release", mixer, tokenizer, max_seq_len=64, hidden_size=64)
    config = FinetuneConfig(
        release=str(release),
        task="SST-2",
        output_dir=str(tmp_path / "run"),
        glue_dir=str(SHARED_SST2.parent),
        from_scratch=True,
        max_train_examples=4000,
        learning_rate=5e-3,
        batch_size=32,
        epochs=1,
        device="cpu",
        save_model=False,
    )
    result = train(config, progress=False)
    majority = 444 / 872  # positive examples in dev
    assert result["dev"]["SST-2"]["accuracy"] >= 0.60 > majority + 0.09
