"""The GLUE tasks as data: where each split's file is, which columns hold what, labels, metrics,
the Hugging Face `glue` config, and the name the GLUE server wants for the submission file.

Label strings are the ones the GLUE files (and the server) use: "0"/"1" for CoLA, SST-2, MRPC,
QQP and WNLI, entailment/... for MNLI, QNLI, RTE and AX; STS-B is a regression (score 0..5).
The order of `labels` is also the Hugging Face `glue` ClassLabel order, so HF label i is labels[i].

A task made from a user's own files (`--train-file`) is a `Task` too, with `files` saying where its
data is; `finetune.files` builds it and reads its splits.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import FinetuneError


@dataclass(frozen=True)
class Columns:
    """Header names (files with a header) or 0-based positions (CoLA's headerless train/dev)."""

    text_a: str | int
    text_b: str | int | None = None
    label: str | int | None = None  # None: an unlabelled test file
    index: str | int | None = None  # the id the GLUE server wants back; None: the row number


STSB_RANGE = (0.0, 5.0)


@dataclass(frozen=True)
class FileSpec:
    """Where a user's task reads its data: files in jsonl, csv or tsv (optionally .gz), by column name."""

    train: str
    dev: str | None  # None: `dev_size` rows of the training file are held out
    test: str | None  # None: nothing to predict
    dev_size: int | None
    id_field: str | None  # None: a column named "id" when the file has one, else the line number


@dataclass(frozen=True)
class Split:
    files: tuple[str, ...]  # candidates under the GLUE folder, the first that exists is read
    hf_split: str  # the same split in the Hugging Face `glue` config
    columns: Columns
    header: bool = True

    @property
    def labelled(self) -> bool:
        return self.columns.label is not None

    @property
    def file(self) -> str:
        return self.files[0]


@dataclass(frozen=True)
class EvalSet:
    """What the GLUE server scores as one entry: a dev set (labels) and its test set, e.g. MNLI-m."""

    name: str  # also the submission file's stem: CoLA -> CoLA.tsv, MNLI-m -> MNLI-m.tsv
    dev: Split | None  # None: AX has no labelled dev set
    test: Split
    test_size: int  # rows the GLUE server expects in the submission file


@dataclass(frozen=True)
class Task:
    name: str
    labels: tuple[str, ...] | None  # None: regression
    metrics: tuple[str, ...]  # names in finetune.metrics.METRICS; the task score is their mean
    train: Split | None  # None: AX, predicted by the model fine-tuned on `predicted_by`
    evals: tuple[EvalSet, ...]
    hf_config: str
    hf_text: tuple[str, str | None]  # the HF columns holding text_a and text_b
    skip_malformed: bool = False  # QQP: rows with missing fields are skipped and counted
    predicted_by: str | None = None
    score_range: tuple[float, float] | None = None  # regression: predictions are clipped to it (STS-B)
    files: FileSpec | None = None  # a task from the user's own files (not GLUE)

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return self.hf_text[1] is not None


BINARY = ("0", "1")
NLI3 = ("entailment", "neutral", "contradiction")
NLI2 = ("entailment", "not_entailment")


def _task(
    name: str, labels, metrics, text_a, text_b, label, hf_config, hf_text, test_size, test_index="index", **kw
) -> Task:
    """A task with the usual layout: <name>/{train,dev,test}.tsv, all with a header."""
    labelled = Columns(text_a, text_b, label=label)
    test = Columns(text_a, text_b, index=test_index)
    return Task(
        name=name,
        labels=labels,
        metrics=metrics,
        hf_config=hf_config,
        hf_text=hf_text,
        train=Split((f"{name}/train.tsv",), "train", labelled),
        evals=(
            EvalSet(
                name,
                Split((f"{name}/dev.tsv",), "validation", labelled),
                Split((f"{name}/test.tsv",), "test", test),
                test_size,
            ),
        ),
        **kw,
    )


# CoLA's train/dev have no header: source, label, original annotation, sentence. Its test has one.
_COLA_LABELLED = Columns(text_a=3, label=1)
_MNLI_LABELLED = Columns("sentence1", "sentence2", label="gold_label")  # the last column: train has 12, dev 16
_MNLI_TEST = Columns("sentence1", "sentence2", index="index")

TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        Task(
            name="CoLA",
            labels=BINARY,
            metrics=("mcc",),
            hf_config="cola",
            hf_text=("sentence", None),
            train=Split(("CoLA/train.tsv",), "train", _COLA_LABELLED, header=False),
            evals=(
                EvalSet(
                    "CoLA",
                    Split(("CoLA/dev.tsv",), "validation", _COLA_LABELLED, header=False),
                    Split(("CoLA/test.tsv",), "test", Columns("sentence", index="index")),
                    1063,
                ),
            ),
        ),
        _task("SST-2", BINARY, ("accuracy",), "sentence", None, "label", "sst2", ("sentence", None), 1821),
        _task(
            "MRPC",
            BINARY,
            ("f1", "accuracy"),
            "#1 String",
            "#2 String",
            "Quality",
            "mrpc",
            ("sentence1", "sentence2"),
            1725,
        ),
        _task(
            "STS-B",
            None,
            ("pearson", "spearman"),
            "sentence1",
            "sentence2",
            "score",
            "stsb",
            ("sentence1", "sentence2"),
            1379,
        ),
        _task(
            "QQP",
            BINARY,
            ("f1", "accuracy"),
            "question1",
            "question2",
            "is_duplicate",
            "qqp",
            ("question1", "question2"),
            390965,
            test_index="id",
            skip_malformed=True,
        ),
        Task(
            name="MNLI",
            labels=NLI3,
            metrics=("accuracy",),
            hf_config="mnli",
            hf_text=("premise", "hypothesis"),
            train=Split(("MNLI/train.tsv",), "train", _MNLI_LABELLED),
            evals=(
                EvalSet(
                    "MNLI-m",
                    Split(("MNLI/dev_matched.tsv",), "validation_matched", _MNLI_LABELLED),
                    Split(("MNLI/test_matched.tsv",), "test_matched", _MNLI_TEST),
                    9796,
                ),
                EvalSet(
                    "MNLI-mm",
                    Split(("MNLI/dev_mismatched.tsv",), "validation_mismatched", _MNLI_LABELLED),
                    Split(("MNLI/test_mismatched.tsv",), "test_mismatched", _MNLI_TEST),
                    9847,
                ),
            ),
        ),
        _task("QNLI", NLI2, ("accuracy",), "question", "sentence", "label", "qnli", ("question", "sentence"), 5463),
        _task("RTE", NLI2, ("accuracy",), "sentence1", "sentence2", "label", "rte", ("sentence1", "sentence2"), 3000),
        _task(
            "WNLI", BINARY, ("accuracy",), "sentence1", "sentence2", "label", "wnli", ("sentence1", "sentence2"), 146
        ),
        # The diagnostic set: test only, predicted with the MNLI model. download_glue_data.py writes
        # diagnostic/diagnostic.tsv; AX/test.tsv is accepted too.
        Task(
            name="AX",
            labels=NLI3,
            metrics=(),
            hf_config="ax",
            hf_text=("premise", "hypothesis"),
            train=None,
            evals=(
                EvalSet(
                    "AX",
                    None,
                    Split(
                        ("diagnostic/diagnostic.tsv", "AX/test.tsv"),
                        "test",
                        Columns("sentence1", "sentence2", index="index"),
                    ),
                    1104,
                ),
            ),
            predicted_by="MNLI",
        ),
    )
}

# The nine tasks of the benchmark (AX is a diagnostic, not part of the GLUE score).
GLUE_TASKS: tuple[str, ...] = tuple(name for name, task in TASKS.items() if task.train is not None)


def get_task(name: str) -> Task:
    """Look a task up by name; case and the dash are forgiven (sst2, sts-b, mnli)."""
    if name in TASKS:
        return TASKS[name]
    folded = {_fold(key): task for key, task in TASKS.items()}
    if _fold(name) in folded:
        return folded[_fold(name)]
    raise FinetuneError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")


def trainable_task(name: str) -> Task:
    task = get_task(name)
    if task.train is None:
        raise FinetuneError(
            f"task {task.name} has no training data: it is predicted with the {task.predicted_by} model"
        )
    return task


def parse_tasks(spec: str | list[str] | tuple[str, ...]) -> list[str]:
    """'all' or a comma-separated list (or a list) -> canonical names of trainable tasks, in GLUE order."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = [n.strip() for n in names if n.strip()]
    if names == ["all"]:
        return list(GLUE_TASKS)
    if not names:
        raise FinetuneError("no task given")
    chosen = {trainable_task(n).name for n in names}
    return [name for name in GLUE_TASKS if name in chosen]


def _fold(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")
