"""GLUE data: the GLUE folder layout (TSV, with each task's quirks) or Hugging Face `datasets`,
tokenised with a release's `tokenizer.json`, then batched with padding.

Quirks handled here, driven by the data in `tasks.py`: CoLA's headerless train/dev (columns by
position), MRPC's byte-order mark, MNLI's two dev and test sets (label = `gold_label`), QQP's
malformed rows (too few fields: skipped and counted), AX under `diagnostic/`, a stray carriage
return inside a field. GLUE's files are not CSV-quoted (a field may start with a quote), so they
are read with `csv.QUOTE_NONE`.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from finetune.errors import FinetuneError, where
from finetune.tasks import STSB_RANGE, Columns, Split, Task

TOKENIZER_FILE = "tokenizer.json"
HF_HUB_NAME = "nyu-mll/glue"  # what the `--hf` flag loads when given no value

csv.field_size_limit(sys.maxsize)  # a few GLUE fields are long; the csv default (128 KiB) is arbitrary


@dataclass
class Examples:
    text_a: list[str]
    text_b: list[str] | None
    labels: list[int] | list[float] | None  # label ids (classification) or scores (regression)
    index: list[str]  # the ids the GLUE server wants back with each prediction
    origin: str  # file or dataset it came from, for messages
    skipped: int = 0  # malformed rows skipped (QQP)

    def __len__(self) -> int:
        return len(self.text_a)

    def subset(self, rows: list[int]) -> Examples:
        pick = lambda values: None if values is None else [values[i] for i in rows]
        return Examples(
            pick(self.text_a), pick(self.text_b), pick(self.labels), pick(self.index), self.origin, self.skipped
        )


def read_split(task: Task, split: Split, glue_dir: str | None = None, hf_dataset: str | None = None) -> Examples:
    """One split of a task from a GLUE folder or from Hugging Face `datasets` (exactly one of the two),
    or, for a task made from the user's files, from its own files (finetune.files)."""
    if task.files is not None:
        from finetune.files import read_file  # it builds on this module

        return read_file(task, split)
    if (glue_dir is None) == (hf_dataset is None):
        raise FinetuneError("give exactly one data source: a GLUE folder or a Hugging Face dataset")
    if glue_dir is not None:
        return read_tsv(task, split, glue_dir)
    return read_hf(task, split, hf_dataset)


def find_file(split: Split, glue_dir: str | Path) -> Path | None:
    return next((Path(glue_dir) / f for f in split.files if (Path(glue_dir) / f).is_file()), None)


# ---- GLUE folder -----------------------------------------------------------------------------------


def read_tsv(task: Task, split: Split, glue_dir: str | Path) -> Examples:
    path = find_file(split, glue_dir)
    if path is None:
        expected = " or ".join(str(Path(glue_dir) / f) for f in split.files)
        raise FinetuneError(f"{expected}: no such file (expected the GLUE layout <glue_dir>/<TASK>/<split>.tsv)")
    # utf-8-sig: MRPC's files start with a byte-order mark. Rows end at "\n" only: some copies carry a
    # stray "\r" inside a field (e.g. SST-2 files whose columns were reordered from CRLF lines), which
    # the csv module would take for a row end; it becomes a space, and a CRLF ending is dropped.
    with open(path, encoding="utf-8-sig", newline="\n") as handle:
        lines = (text.rstrip("\r\n").replace("\r", " ") for text in handle)
        rows = csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE)
        line = 0
        if split.header:
            header = next(rows, None)
            line = 1
            if header is None:
                raise FinetuneError(f"{path}: empty file (expected a header line)")
            positions = _positions(split.columns, header, path)
        else:
            positions = split.columns
        needed = 1 + max(
            p for p in (positions.text_a, positions.text_b, positions.label, positions.index) if p is not None
        )
        out = Examples([], [] if positions.text_b is not None else None, [] if split.labelled else None, [], str(path))
        first_skipped = None
        for row in rows:
            line += 1
            if not row or row == [""]:
                continue  # a blank line (e.g. a trailing newline twice)
            if len(row) < needed:
                if task.skip_malformed:
                    out.skipped += 1
                    first_skipped = first_skipped or line
                    continue
                raise FinetuneError(
                    f"{where(path, line)}: expected at least {needed} tab-separated fields, found {len(row)}"
                )
            out.text_a.append(row[positions.text_a])
            if out.text_b is not None:
                out.text_b.append(row[positions.text_b])
            if out.labels is not None:
                out.labels.append(parse_label(task, row[positions.label], where(path, line)))
            out.index.append(row[positions.index] if positions.index is not None else str(len(out.index)))
    if out.skipped:
        print(
            f"finetune: {path}: skipped {out.skipped} malformed rows with fewer than {needed} fields "
            f"(the first at line {first_skipped})",
            file=sys.stderr,
        )
    if not len(out):
        raise FinetuneError(f"{path}: no examples")
    return out


def _positions(columns: Columns, header: list[str], path: Path) -> Columns:
    """Header names -> positions; a missing column is an error naming what the header has."""

    def find(name):
        if name is None or isinstance(name, int):
            return name
        if name not in header:
            raise FinetuneError(f"{where(path, 1)}: no column {name!r} in the header (found: {', '.join(header)})")
        return header.index(name)

    return Columns(find(columns.text_a), find(columns.text_b), find(columns.label), find(columns.index))


def parse_label(task: Task, raw: str, place: str) -> int | float:
    """A label string from a file -> label id (classification) or score (STS-B)."""
    value = raw.strip()
    if task.labels is not None:
        if value not in task.labels:
            raise FinetuneError(f"{place}: label {value!r} is not one of {', '.join(task.labels)}")
        return task.labels.index(value)
    try:
        score = float(value)
    except ValueError:
        score = math.nan
    if not STSB_RANGE[0] <= score <= STSB_RANGE[1]:
        raise FinetuneError(f"{place}: label {value!r} is not a score in [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
    return score


# ---- Hugging Face datasets -------------------------------------------------------------------------


def read_hf(task: Task, split: Split, source: str) -> Examples:
    """A split of the `glue` dataset: from the hub (`nyu-mll/glue` or another name), or from a local
    copy written by `DatasetDict.save_to_disk`: either `<source>/<config>/` (e.g. glue/cola) or the
    task's own DatasetDict at `<source>`."""
    dataset = _load_hf(task, split.hf_split, source)
    origin = f"{source}[{task.hf_config}/{split.hf_split}]"
    text_a, text_b = task.hf_text
    for column in (c for c in (text_a, text_b, "label", "idx") if c):
        if column not in dataset.column_names:
            raise FinetuneError(f"{origin}: no column {column!r} (found: {', '.join(dataset.column_names)})")
    labels = None
    if split.labelled:
        labels = [_hf_label(task, value, f"{origin} row {row}") for row, value in enumerate(dataset["label"])]
    out = Examples(
        list(dataset[text_a]),
        list(dataset[text_b]) if text_b else None,
        labels,
        [str(i) for i in dataset["idx"]],
        origin,
    )
    if not len(out):
        raise FinetuneError(f"{origin}: no examples")
    return out


def _load_hf(task: Task, split: str, source: str):
    import datasets  # imported here: heavy, and only this path needs it

    path = Path(source)
    if path.is_dir():
        folder = hf_folder(task, path)
        if folder is None:
            raise FinetuneError(
                f"{path}: not a `datasets` folder (expected {path / task.hf_config}/dataset_dict.json, "
                "written by DatasetDict.save_to_disk)"
            )
        splits = datasets.load_from_disk(str(folder))
        if split not in splits:
            raise FinetuneError(f"{folder}: no split {split!r} (found: {', '.join(splits)})")
        return splits[split]
    try:
        return datasets.load_dataset(source, task.hf_config, split=split)
    except Exception as err:  # the hub's errors are many and unrelated; keep one clear line
        raise FinetuneError(
            f"datasets.load_dataset({source!r}, {task.hf_config!r}, split={split!r}) failed: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        ) from None


def hf_folder(task: Task, path: Path) -> Path | None:
    """The task's DatasetDict in a local copy: <path>/<config> (e.g. glue/cola), or <path> itself."""
    return next((p for p in (path / task.hf_config, path) if (p / "dataset_dict.json").is_file()), None)


def _hf_label(task: Task, value, place: str) -> int | float:
    if task.labels is None:
        if not STSB_RANGE[0] <= float(value) <= STSB_RANGE[1]:
            raise FinetuneError(f"{place}: label {value!r} is not a score in [{STSB_RANGE[0]:g}, {STSB_RANGE[1]:g}]")
        return float(value)
    if not isinstance(value, int) or not 0 <= value < len(task.labels):
        raise FinetuneError(
            f"{place}: label {value!r} is not one of 0..{len(task.labels) - 1} ({', '.join(task.labels)})"
        )
    return value


# ---- tokenisation and batches ----------------------------------------------------------------------


@dataclass
class Encoded:
    """Token ids of every example, flat with offsets: MNLI's 393k pairs as Python lists of ints would
    take ~1 GB, as arrays ~40 MB."""

    tokens: np.ndarray  # int32, all examples' token ids back to back
    types: np.ndarray  # int8, their segment ids
    offsets: np.ndarray  # int64, example i is tokens[offsets[i]:offsets[i + 1]]
    labels: torch.Tensor | None  # (N,) int64 label ids, or float32 scores; per row (window)
    index: list[str]  # per document
    # With windows: the document each row (window) comes from, rows of a document next to each other;
    # None: one row per document.
    documents: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_documents(self) -> int:
        return len(self.index)

    @property
    def document_labels(self) -> torch.Tensor | None:
        """One label per document (a document's windows share its label)."""
        if self.labels is None or self.documents is None:
            return self.labels
        first = torch.ones(len(self), dtype=torch.bool)
        first[1:] = self.documents[1:] != self.documents[:-1]
        return self.labels[first]

    @cached_property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def type_ids(self, i: int) -> np.ndarray:
        return self.types[self.offsets[i] : self.offsets[i + 1]]


def load_tokenizer(release: str | Path, max_len: int):
    """The release's `tokenizer.json`, truncating to max_len (special tokens included), not padding."""
    from tokenizers import Tokenizer

    path = Path(release) / TOKENIZER_FILE
    if not path.is_file():
        raise FinetuneError(
            f"{path}: no such file (a release folder holds config.json, model.safetensors, tokenizer.json)"
        )
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:
        raise FinetuneError(f"{path}: not a `tokenizers` file ({err})") from None
    if tokenizer.post_processor is None:
        raise FinetuneError(
            f"{path}: the tokenizer has no post-processor, so inputs would get no [CLS]/[SEP] "
            "and sentence pairs no segment ids"
        )
    tokenizer.no_padding()  # batches are padded here, to what each batch needs
    tokenizer.enable_truncation(max_length=max_len)  # longest_first: pairs lose tokens from the longer side
    return tokenizer


def encode(tokenizer, examples: Examples, regression: bool, windows: bool = False, chunk: int = 8192) -> Encoded:
    """Tokenise in chunks (the tokenizer's per-example objects are large), keeping flat arrays. With
    `windows`, an input longer than the tokenizer's truncation length gives one row per window (the
    tokenizer's overflowing pieces, each with its own [CLS]/[SEP]); otherwise it is truncated."""
    tokens, types, lengths, documents = [], [], [], []
    for start in range(0, len(examples), chunk):
        a = examples.text_a[start : start + chunk]
        inputs = a if examples.text_b is None else list(zip(a, examples.text_b[start : start + chunk]))
        for number, encoding in enumerate(tokenizer.encode_batch(inputs), start=start):
            for e in [encoding, *encoding.overflowing] if windows else [encoding]:
                tokens.append(np.asarray(e.ids, dtype=np.int32))
                types.append(np.asarray(e.type_ids, dtype=np.int8))
                lengths.append(len(e.ids))
                documents.append(number)
    labels = None
    rows = torch.tensor(documents, dtype=torch.long)
    if examples.labels is not None:
        labels = torch.tensor(examples.labels, dtype=torch.float32 if regression else torch.long)[rows]
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return Encoded(
        np.concatenate(tokens),
        np.concatenate(types),
        offsets,
        labels,
        list(examples.index),
        rows if windows else None,
    )


def batches(
    data: Encoded,
    batch_size: int,
    pad_id: int,
    order: torch.Tensor | None = None,
    pad_to: int | None = None,
) -> Iterator[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """(rows, batch) pairs over `order` (default: longest first, which keeps padding small at
    evaluation). Each batch is padded to its longest row, or to `pad_to` when given (FNet)."""
    if order is None:
        order = torch.from_numpy(np.argsort(-data.lengths, kind="stable"))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        yield rows, collate(data, rows.tolist(), pad_id, pad_to)


def collate(data: Encoded, rows: list[int], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    lengths = data.lengths[rows]
    length = pad_to or int(lengths.max())
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    type_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, i in enumerate(rows):
        input_ids[r, : lengths[r]] = torch.from_numpy(data.ids(i))
        type_ids[r, : lengths[r]] = torch.from_numpy(data.type_ids(i))
    mask = (torch.arange(length) < torch.from_numpy(lengths)[:, None]).long()
    batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": type_ids}
    if data.labels is not None:
        batch["labels"] = data.labels[rows]
    return batch
