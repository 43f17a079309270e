"""Tasks from a user's own files: jsonl, csv or tsv (each optionally gzipped), columns by name.

`file_task(config)` turns the `--train-file ...` settings into a `Task` (its labels are the ones the
training part holds, in sorted order: integers by value, strings alphabetically), and `read_file`
reads one of its splits as `Examples`, as `data.read_split` does for GLUE. Without a dev file,
`--dev-size N` holds N rows of the training file out as the dev set: the N rows whose id (or line
number) has the smallest hash, so the split is the same on every run and every seed and never
overlaps the training part. `--max-train-examples` takes its subset the same way (another hash), so
it is seed-independent too and a smaller subset lies inside a larger one.

Every mistake in a file is one `FinetuneError` line naming the file (and line where there is one).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from finetune.data import Examples
from finetune.errors import FinetuneError, where
from finetune.tasks import Columns, EvalSet, FileSpec, Split, Task, get_task

FORMATS = (".jsonl", ".csv", ".tsv")
DEFAULT_ID_FIELD = "id"  # used for ids when --id-field is not given and the file has this column
_INTEGER = re.compile(r"[+-]?\d+")


def file_format(path: str | Path) -> str:
    """'.jsonl', '.csv' or '.tsv' from the file's name (a '.gz' after it is allowed)."""
    name = Path(path).name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix not in FORMATS:
        raise FinetuneError(
            f"{path}: unknown format {suffix or '(no suffix)'!r} (expected .jsonl, .csv or .tsv, optionally .gz)"
        )
    return suffix


def default_task_name(train_file: str | Path) -> str:
    """The task's name when none is given: the file's name without its suffixes, or the folder's name
    when the file is called train (imdb/train.jsonl.gz -> imdb)."""
    path = Path(train_file)
    stem = path.name.lower().removesuffix(".gz")
    stem = path.name[: len(stem) - len(Path(stem).suffix)]
    return path.resolve().parent.name if stem.lower() == "train" and path.resolve().parent.name else stem


def task_of(config: Any) -> Task:
    """The task a FinetuneConfig trains: a GLUE task, or one made from the user's files."""
    return file_task(config) if config.train_file else get_task(config.task)


def file_task(config: Any) -> Task:
    """A Task from a FinetuneConfig with `train_file`: reads the training file for its labels."""
    spec = FileSpec(config.train_file, config.dev_file, config.test_file, config.dev_size, config.id_field)
    columns = Columns(config.text_field, config.text_pair_field, label=config.label_field)
    labels = None
    if config.problem == "classification":
        table = read_table(spec.train, columns, spec.id_field)
        labels = label_set(table, training_rows(spec, table))
    train = Split((spec.train,), "train", columns)
    dev = Split((spec.dev or spec.train,), "validation", columns)
    test = Split((spec.test,) if spec.test else (), "test", Columns(config.text_field, config.text_pair_field))
    return Task(
        name=config.task,
        labels=labels,
        metrics=("accuracy",) if labels is not None else ("pearson", "spearman"),
        train=train,
        evals=(EvalSet(config.task, dev, test, test_size=0),),
        hf_config="",
        hf_text=(config.text_field, config.text_pair_field),
        files=spec,
    )


def saved_task(info: dict[str, Any], test_file: str) -> Task:
    """The task a fine-tuned model folder's finetune.json describes, predicting `test_file`."""
    if not Path(test_file).is_file():
        raise FinetuneError(f"{test_file}: no such file (--test-file)")
    file_format(test_file)
    labels = info["labels"]
    test = Split((str(test_file),), "test", Columns(info["text_field"], info["text_pair_field"]))
    return Task(
        name=info["task"],
        labels=None if labels is None else tuple(labels),
        metrics=(),
        train=None,
        evals=(EvalSet(info["task"], None, test, test_size=0),),
        hf_config="",
        hf_text=(info["text_field"], info["text_pair_field"]),
        files=FileSpec("", None, str(test_file), None, info["id_field"]),
    )


def read_file(task: Task, split: Split) -> Examples:
    """One split of a file task: the training part, the dev set (its file, or the held-out rows of the
    training file) or the test file (labels not read)."""
    spec = task.files
    if spec is None:
        raise FinetuneError(f"task {task.name} is not read from files")
    labelled = split.columns.label is not None
    table = read_table(split.files[0], split.columns, spec.id_field, labelled)
    rows = list(range(len(table.lines)))
    if split.hf_split == "train":
        rows = training_rows(spec, table)
    elif split.hf_split == "validation" and spec.dev is None:
        rows = held_out_rows(spec, table)
    labels: list[int] | list[float] | None = None
    if labelled:
        labels = label_ids(task, table, rows) if task.labels is not None else scores(table, rows)
    examples = Examples(
        [table.text[r] for r in rows],
        None if table.pair is None else [table.pair[r] for r in rows],
        labels,
        [table.ids[r] for r in rows],
        table.path if len(rows) == len(table.lines) else f"{table.path} ({split.hf_split} part: {len(rows)} rows)",
    )
    if not len(examples):
        raise FinetuneError(f"{table.path}: no examples")
    return examples


# ---- the dev split and the fixed subset --------------------------------------------------------------


def hash_order(keys: list[str], salt: str) -> list[int]:
    """Row numbers ordered by a hash of (salt, key): a fixed shuffle that depends on nothing else."""
    digest = lambda key: hashlib.blake2b(f"{salt}\0{key}".encode(), digest_size=8).digest()
    return sorted(range(len(keys)), key=lambda row: (digest(keys[row]), row))


def held_out_rows(spec: FileSpec, table: Table) -> list[int]:
    """The rows of the training file that form the dev set (with --dev-size), in file order."""
    if spec.dev_size is None:
        return []
    if spec.dev_size >= len(table.lines):
        raise FinetuneError(
            f"{table.path}: --dev-size {spec.dev_size} leaves no training rows (the file has {len(table.lines)})"
        )
    return sorted(hash_order(table.ids, "dev")[: spec.dev_size])


def training_rows(spec: FileSpec, table: Table) -> list[int]:
    held = set(held_out_rows(spec, table)) if spec.dev is None else set()
    return [row for row in range(len(table.lines)) if row not in held]


def fixed_subset(examples: Examples, size: int) -> Examples:
    """`size` training examples, the same whatever the seed (a hash of each id); smaller inside larger."""
    return examples.subset(sorted(hash_order(examples.index, "subset")[:size]))


# ---- reading a file ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """The columns a task needs from one file, with the line each row starts on."""

    path: str
    lines: list[int]
    text: list[str]
    pair: list[str] | None
    labels: list[Any] | None  # raw values: str (csv/tsv) or any JSON value (jsonl)
    ids: list[str]  # the id column's values, else the line numbers


def read_table(path: str, columns: Columns, id_field: str | None, labelled: bool = True) -> Table:
    stat = os.stat(path)  # cached per file version: a task reads its training file more than once
    return _read_table(str(path), stat.st_mtime_ns, stat.st_size, columns, id_field, labelled)


@lru_cache(maxsize=4)
def _read_table(path: str, _mtime: int, _size: int, columns: Columns, id_field: str | None, labelled: bool) -> Table:
    suffix = file_format(path)
    records = _json_lines(path) if suffix == ".jsonl" else _delimited(path, "\t" if suffix == ".tsv" else ",")
    first = next(records, None)
    if first is None:
        raise FinetuneError(f"{path}: no rows")
    line, record = first
    wanted = [c for c in (columns.text_a, columns.text_b, columns.label if labelled else None) if c is not None]
    ids = id_field or (DEFAULT_ID_FIELD if DEFAULT_ID_FIELD in record else None)
    for column in wanted + ([ids] if ids else []):
        if column not in record:
            raise FinetuneError(f"{path}: no column {column!r} (the file has: {', '.join(map(str, record))})")
    table = Table(path, [], [], [] if columns.text_b is not None else None, [] if labelled else None, [])
    for line, record in _chain(first, records):
        place = where(path, line)
        for column in wanted + ([ids] if ids else []):
            if column not in record:
                raise FinetuneError(f"{place}: no field {column!r} (the line has: {', '.join(map(str, record))})")
        table.lines.append(line)
        table.text.append(_text(record[columns.text_a], columns.text_a, place))
        if table.pair is not None and columns.text_b is not None:
            table.pair.append(_text(record[columns.text_b], columns.text_b, place))
        if table.labels is not None:
            table.labels.append(record[columns.label])
        table.ids.append(str(record[ids]) if ids else str(line))
    return table


def _chain(first, rest):
    yield first
    yield from rest


def _open(path: str):
    # utf-8-sig: a byte-order mark (spreadsheet exports) is not part of the first column's name.
    if path.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _json_lines(path: str):
    with _open(path) as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise FinetuneError(f"{where(path, line)}: not valid JSON ({err.msg})") from None
            if not isinstance(record, dict):
                raise FinetuneError(f"{where(path, line)}: expected a JSON object, got {type(record).__name__}")
            yield line, record


def _delimited(path: str, delimiter: str):
    with _open(path) as handle:
        rows = csv.reader(handle, delimiter=delimiter)
        header = next(rows, None)
        if header is None:
            return
        start = rows.line_num + 1
        for row in rows:
            line, start = start, rows.line_num + 1  # a quoted field may span lines: the row's first line
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise FinetuneError(
                    f"{where(path, line)}: expected {len(header)} {'tab' if delimiter == chr(9) else 'comma'}-separated "
                    f"fields (the header's), found {len(row)}"
                )
            yield line, dict(zip(header, row, strict=True))


def _text(value: Any, column: str | int, place: str) -> str:
    if not isinstance(value, str):
        raise FinetuneError(f"{place}: field {column!r} is not text (got {json.dumps(value)})")
    return value


# ---- labels --------------------------------------------------------------------------------------------


def _label(value: Any, place: str) -> tuple[str, str]:
    """A classification label -> (its type, its string): 'integer' for 1 or "1", 'string', 'boolean'."""
    if isinstance(value, bool):
        return "boolean", "true" if value else "false"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return "integer", str(int(value))
    if isinstance(value, str) and value.strip():
        text = value.strip()
        return ("integer", str(int(text))) if _INTEGER.fullmatch(text) else ("string", text)
    if isinstance(value, float):
        raise FinetuneError(f"{place}: label {value!r} is not a class (for a numeric target use --problem regression)")
    raise FinetuneError(f"{place}: label {json.dumps(value)} is not a class (expected a string or an integer)")


def label_set(table: Table, rows: list[int]) -> tuple[str, ...]:
    """The classes in the training rows, sorted (integers by value, strings alphabetically); a column
    that mixes types is refused at the first row that differs."""
    assert table.labels is not None
    seen: dict[str, str] = {}
    first: tuple[str, int, Any] | None = None
    for row in rows:
        place = where(table.path, table.lines[row])
        kind, text = _label(table.labels[row], place)
        if first is None:
            first = (kind, table.lines[row], table.labels[row])
        elif kind != first[0]:
            raise FinetuneError(
                f"{place}: label {json.dumps(table.labels[row])} is {_a(kind)}, but the label at line {first[1]} "
                f"({json.dumps(first[2])}) is {_a(first[0])}; a label column holds one type"
            )
        seen[text] = kind
    if not seen:
        raise FinetuneError(f"{table.path}: no labelled rows")
    if first is not None and first[0] == "integer":
        return tuple(sorted(seen, key=int))
    return tuple(sorted(seen))


def label_ids(task: Task, table: Table, rows: list[int]) -> list[int]:
    """Label ids of the rows, by the task's (training) labels; a label training did not have is refused."""
    assert table.labels is not None and task.labels is not None
    ids = {text: number for number, text in enumerate(task.labels)}
    out = []
    for row in rows:
        place = where(table.path, table.lines[row])
        _, text = _label(table.labels[row], place)
        if text not in ids:
            raise FinetuneError(
                f"{place}: label {json.dumps(table.labels[row])} was not seen in training "
                f"(the training labels: {', '.join(task.labels)})"
            )
        out.append(ids[text])
    return out


def scores(table: Table, rows: list[int]) -> list[float]:
    """Regression targets: numbers (or numeric strings), finite."""
    assert table.labels is not None
    out = []
    for row in rows:
        value = table.labels[row]
        try:
            number = float(value) if not isinstance(value, bool) else math.nan
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number):
            raise FinetuneError(
                f"{where(table.path, table.lines[row])}: label {json.dumps(value)} is not a number (--problem regression)"
            )
        out.append(number)
    return out


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"
