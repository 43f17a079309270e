"""Test-set predictions in the format the GLUE server expects, and the zip to upload.

One file per scored entry, named as the server wants (CoLA.tsv, SST-2.tsv, MRPC.tsv, STS-B.tsv,
QQP.tsv, MNLI-m.tsv, MNLI-mm.tsv, QNLI.tsv, RTE.tsv, WNLI.tsv, AX.tsv), each a header
`index<TAB>prediction` and one row per test example: the test file's index (QQP: its id) and the
label string (0/1, entailment/neutral/contradiction, entailment/not_entailment) or, for STS-B, a
score clipped to [0, 5]. AX is predicted by the MNLI model. The server wants all eleven files.
"""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

from common.files import atomic_path, write_text_atomic
from finetune.data import find_file, hf_folder, read_split
from finetune.errors import FinetuneError
from finetune.model import Runner, load
from finetune.tasks import TASKS, EvalSet, Task, get_task

HEADER = "index\tprediction"
FINETUNE_FILE = "finetune.json"  # in a fine-tuned model folder: the task and sequence length it was trained with
SUBMISSION_FILES: dict[str, tuple[Task, EvalSet]] = {
    f"{ev.name}.tsv": (task, ev) for task in TASKS.values() for ev in task.evals
}


def prediction_strings(task: Task, predictions) -> list[str]:
    if task.labels is None:
        if task.score_range is None:
            return [f"{float(x):.6g}" for x in predictions]
        low, high = task.score_range
        return [f"{min(max(float(x), low), high):.3f}" for x in predictions]
    return [task.labels[int(i)] for i in predictions]


def write_predictions(path: str | Path, index: list[str], strings: list[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = HEADER + "\n" + "".join(f"{i}\t{p}\n" for i, p in zip(index, strings, strict=True))
    return write_text_atomic(path, text)


def predict_tests(
    runner: Runner,
    task: Task,
    out_dir: str | Path,
    glue_dir: str | None = None,
    hf_dataset: str | None = None,
    batch_size: int = 128,
) -> list[Path]:
    """Predict every test set this task's model answers (MNLI: also AX) that the data source has;
    write <out_dir>/<name>.tsv for each. Returns the files written."""
    written = []
    for answered in [task] + [t for t in TASKS.values() if t.predicted_by == task.name]:
        for ev in answered.evals:
            if not _has_split(answered, ev, glue_dir, hf_dataset):
                if answered.files is not None:
                    continue  # no --test-file: nothing to predict
                print(
                    f"finetune: no {ev.name} test set in {glue_dir or hf_dataset}; no {ev.name}.tsv written",
                    file=sys.stderr,
                )
                continue
            examples = read_split(answered, ev.test, glue_dir, hf_dataset)
            predictions = runner.predict(runner.encode(examples), batch_size)
            written.append(
                write_predictions(
                    Path(out_dir) / f"{ev.name}.tsv", examples.index, prediction_strings(answered, predictions)
                )
            )
    return written


def _has_split(task: Task, ev: EvalSet, glue_dir: str | None, hf_dataset: str | None) -> bool:
    if task.files is not None:
        return bool(ev.test.files)
    if glue_dir is not None:
        return find_file(ev.test, glue_dir) is not None
    if not Path(hf_dataset).is_dir():
        return True  # the hub's glue has every test split
    folder = hf_folder(task, Path(hf_dataset))
    return folder is not None and ev.test.hf_split in json.loads((folder / "dataset_dict.json").read_text())["splits"]


def check_file(path: Path) -> list[str]:
    """Problems that would make the server reject a prediction file ([] = fine)."""
    if path.name not in SUBMISSION_FILES:
        return [f"{path}: not a GLUE submission file name (expected one of {', '.join(SUBMISSION_FILES)})"]
    task, ev = SUBMISSION_FILES[path.name]
    lines = path.read_text().splitlines()
    if not lines or lines[0] != HEADER:
        return [f"{path}:1: the header must be {HEADER!r}"]
    allowed = None if task.labels is None else set(task.labels)
    for number, line in enumerate(lines[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 2 or (allowed is not None and fields[1] not in allowed):
            return [
                f"{path}:{number}: expected <index><TAB><one of {', '.join(task.labels or ['a score'])}>, got {line!r}"
            ]
    return []


def write_submission(files: list[str | Path], out: str | Path) -> dict:
    """Zip prediction files (names as the server wants them) into `out`. Returns a report: the
    files, those of the eleven that are missing, and files whose row count is not the server's."""
    by_name: dict[str, Path] = {}
    for file in map(Path, files):
        if file.name in by_name:
            raise FinetuneError(f"two prediction files named {file.name}: {by_name[file.name]} and {file}")
        problems = check_file(file)
        if problems:
            raise FinetuneError(problems[0])
        by_name[file.name] = file
    if not by_name:
        raise FinetuneError("no prediction files to zip")
    rows = {name: len(path.read_text().splitlines()) - 1 for name, path in by_name.items()}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in sorted(by_name):
            archive.write(by_name[name], arcname=name)
    report = {
        "zip": str(out),
        "files": sorted(by_name),
        "missing": [name for name in SUBMISSION_FILES if name not in by_name],
        "unexpected_row_counts": {
            name: {"rows": n, "expected": SUBMISSION_FILES[name][1].test_size}
            for name, n in rows.items()
            if n != SUBMISSION_FILES[name][1].test_size
        },
    }
    return report


def prediction_files(folder: str | Path) -> list[Path]:
    """The submission files in a folder (a run's `predictions/` or any folder of them)."""
    return sorted(p for p in Path(folder).glob("*.tsv") if p.name in SUBMISSION_FILES)


def predict_model(
    model_dir: str | Path,
    out_dir: str | Path,
    glue_dir: str | None = None,
    hf_dataset: str | None = None,
    task: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    batch_size: int = 128,
    test_file: str | None = None,
) -> list[Path]:
    """Test-set predictions from a fine-tuned model folder (a run's `model/`): of the GLUE test sets,
    or, for a model fine-tuned on the user's files, of `test_file` (<out_dir>/<task>.tsv)."""
    info_path = Path(model_dir) / FINETUNE_FILE
    if not info_path.is_file():
        raise FinetuneError(f"{info_path}: no such file (is {model_dir} the model/ folder of a fine-tuning run?)")
    info = json.loads(info_path.read_text())
    if "text_field" in info:  # fine-tuned on the user's files
        from finetune.files import saved_task

        if test_file is None:
            raise FinetuneError(f"{model_dir} was fine-tuned on your own files ({info['task']}): give --test-file")
        trained = saved_task(info, test_file)
        glue_dir = hf_dataset = None
    else:
        if test_file is not None:
            raise FinetuneError(
                f"{model_dir} was fine-tuned on {info['task']}: give --glue-dir or --hf, not --test-file"
            )
        trained = get_task(info["task"])
        if task is not None and get_task(task).name != trained.name:
            raise FinetuneError(f"{model_dir}: fine-tuned on {trained.name}, not {get_task(task).name}")
    runner = load(
        model_dir,
        trained.num_labels,
        max_seq_len=info["max_seq_len"],
        device=device,
        precision=precision,
        long_inputs=info.get("long_inputs", "truncate"),
        window_stride=info.get("window_stride"),
    )
    return predict_tests(runner, trained, out_dir, glue_dir, hf_dataset, batch_size)
