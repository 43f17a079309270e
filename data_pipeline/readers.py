"""Input readers: each input kind -> an iterator of raw document texts for one work unit.

Provenance (file and line or row) only matters for messages, which the readers build
themselves, so the hot loop carries nothing but the text.  Readers do not normalise or filter; they
only decode, and they report problems through :class:`ReadStats` / :class:`DataPipelineError`:

* structural errors (a jsonl line that is not JSON or lacks the text field, a null
  parquet value, a corrupt compressed stream) raise with ``file:line`` under
  ``on_error="fail"``; under ``"skip"`` they are counted and reading goes on (a corrupt
  compressed file stops at the damage, keeping what came before);
* invalid UTF-8 is always replaced with U+FFFD and counted.

Big uncompressed ``.txt``/``.jsonl`` files are read by byte range: a unit owns the
lines (or blank-line-separated blocks) that *start* inside ``[start, end)``, reading past
``end`` to finish its last one, so neighbouring units neither lose nor repeat a document.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DataPipelineError, where

TEXT_EXTS = (".txt", ".txt.gz", ".txt.zst")
JSONL_EXTS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")
PARQUET_EXTS = (".parquet",)
SEEKABLE_EXTS = (".txt", ".jsonl", ".ndjson")


@dataclass
class ReadStats:
    docs_read: int = 0
    bad_records: int = 0  # skipped structural errors (on_error=skip)
    corrupt_files: int = 0  # compressed files cut short by damage (on_error=skip)
    encoding_errors_replaced: int = 0
    messages: list = field(default_factory=list)  # first few skipped-error messages

    def skipped(self, msg: str) -> None:
        self.bad_records += 1
        if len(self.messages) < 20:
            self.messages.append(msg)


# --------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    kind: str  # "txt" | "jsonl" | "parquet" | "hf_disk" | "hf_hub"
    path: str  # file/folder path, or the hub dataset name
    size: int = 0  # bytes on disk (0 when unknown)
    config: str | None = None  # hub config name
    split: str | None = None  # hub / DatasetDict split


def kind_of(path: str) -> str | None:
    p = path.lower()
    if p.endswith(TEXT_EXTS):
        return "txt"
    if p.endswith(JSONL_EXTS):
        return "jsonl"
    if p.endswith(PARQUET_EXTS):
        return "parquet"
    return None


def _is_saved_dataset(d: Path) -> bool:
    return (d / "dataset_dict.json").is_file() or (d / "state.json").is_file()


def parse_hf_spec(spec: str, default_split: str) -> Source:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> Source (NAME may contain '/')."""
    body = spec[3:]
    split = default_split
    if "@" in body:
        body, split = body.rsplit("@", 1)
    name, _, config = body.partition(":")
    if not name:
        raise DataPipelineError(f"{spec}: expected hf:NAME[:CONFIG][@SPLIT]")
    return Source("hf_hub", name, 0, config or None, split)


def expand_inputs(inputs: list[str], default_split: str = "train") -> list[Source]:
    """Resolve paths, globs and dataset specs into an ordered list of sources.

    Globs are sorted, so the order (and hence the output) does not depend on the file
    system's listing order.  A missing path, an empty glob or an unknown file type is an error.
    """
    out: list[Source] = []
    for spec in inputs:
        if spec.startswith("hf:"):
            out.append(parse_hf_spec(spec, default_split))
            continue
        split = None
        base = spec
        if "@" in spec and not os.path.exists(spec):
            base, split = spec.rsplit("@", 1)  # a save_to_disk folder with a split: DIR@validation
        if any(ch in base for ch in "*?["):
            paths = sorted(glob.glob(base, recursive=True))
            if not paths:
                raise DataPipelineError(f"{spec}: glob matches no file")
        else:
            if not os.path.exists(base):
                raise DataPipelineError(f"{base}: no such file or directory")
            paths = [base]
        for p in paths:
            pp = Path(p)
            if pp.is_dir():
                if _is_saved_dataset(pp):
                    out.append(Source("hf_disk", str(pp.resolve()), 0, None, split or default_split))
                    continue
                raise DataPipelineError(
                    f"{p}: is a directory but not a datasets save_to_disk folder (use a glob such as '{p}/*.jsonl')"
                )
            k = kind_of(p)
            if k is None:
                raise DataPipelineError(
                    f"{p}: unsupported input type (expected one of {', '.join(TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS)})"
                )
            out.append(Source(k, str(pp.resolve()), pp.stat().st_size))
    return out


# --------------------------------------------------------------------------- decoding helpers


def _decode(b: bytes, stats: ReadStats) -> str:
    try:
        return b.decode("utf-8")
    except UnicodeDecodeError:
        stats.encoding_errors_replaced += 1
        return b.decode("utf-8", errors="replace")


class _LineCounter:
    """Line numbers for messages in byte-range units, computed only when needed."""

    def __init__(self, path: str, start: int):
        self.path, self.start, self._base = path, start, None

    def line(self, offset_lines: int) -> int:
        if self._base is None:
            n = 0
            if self.start:
                with open(self.path, "rb") as f:
                    left = self.start
                    while left > 0:
                        chunk = f.read(min(left, 1 << 22))
                        if not chunk:
                            break
                        n += chunk.count(b"\n")
                        left -= len(chunk)
            self._base = n
        return self._base + offset_lines + 1


def _zst_chunks(path: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Decompressed chunks of a (multi-frame) .zst file.

    Uses ``decompressobj`` rather than ``stream_reader``, because the latter ends silently
    on a truncated frame; here a frame cut short raises, and frames that carry a checksum
    (the ``zstd`` tool writes one by default) are verified by the library.
    """
    import zstandard

    dctx = zstandard.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    with open(path, "rb") as fh:
        while True:
            data = fh.read(chunk)
            if not data:
                break
            while data:
                out = obj.decompress(data)
                fed = True
                if out:
                    yield out
                if obj.eof:  # frame done; the rest starts the next frame
                    data = obj.unused_data
                    obj, fed = dctx.decompressobj(), False
                else:
                    data = b""
    if fed and not obj.eof:
        raise zstandard.ZstdError("truncated zstd frame")


def _zst_lines(path: str) -> Iterator[bytes]:
    rest = b""
    for chunk in _zst_chunks(path):
        lines = (rest + chunk).split(b"\n")
        rest = lines.pop()
        yield from lines
    if rest:
        yield rest


class _Lines:
    """Context manager yielding the lines (without the newline) of a possibly compressed file."""

    def __init__(self, path: str):
        self.path = path
        self.fh = None

    def __enter__(self):
        low = self.path.lower()
        if low.endswith(".zst"):
            return _zst_lines(self.path)
        self.fh = gzip.open(self.path, "rb") if low.endswith(".gz") else open(self.path, "rb", buffering=1 << 20)
        return (line.rstrip(b"\n") for line in self.fh)

    def __exit__(self, *exc):
        if self.fh is not None:
            self.fh.close()


_CORRUPT = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def _corrupt_errors():
    try:
        import zstandard

        return _CORRUPT + (zstandard.ZstdError,)
    except ImportError:  # pragma: no cover
        return _CORRUPT


def _iter_compressed_lines(path: str, stats: ReadStats, on_error: str) -> Iterator[tuple[bytes, int]]:
    """Whole (possibly compressed) file: ``(line_without_eol, line_index)``."""
    errors = _corrupt_errors()
    i = -1
    try:
        with _Lines(path) as f:
            for i, line in enumerate(f):
                yield line.rstrip(b"\r"), i
    except errors as e:
        msg = f"{where(path, i + 2)}: corrupt or truncated compressed data ({type(e).__name__}: {e})"
        if on_error == "fail":
            raise DataPipelineError(msg) from None
        stats.corrupt_files += 1
        stats.skipped(msg)


def _first_line_start(f, start: int) -> int:
    """Offset of the first line that starts at or after ``start``."""
    if start <= 0:
        return 0
    f.seek(start - 1)
    if f.read(1) == b"\n":
        return start
    return start + len(f.readline())


def _iter_range_lines(path: str, start: int) -> Iterator[tuple[bytes, int, int]]:
    """``(line_without_eol, line_start_offset, index)`` from the first line starting at or
    after ``start`` up to EOF; the caller decides where to stop."""
    with open(path, "rb", buffering=1 << 20) as f:
        pos = _first_line_start(f, start)
        f.seek(pos)
        i = 0
        for line in f:
            yield line.rstrip(b"\r\n"), pos, i
            pos += len(line)
            i += 1


def _prev_line_blank(path: str, line_start: int) -> bool:
    """Is the line that ends just before ``line_start`` blank (whitespace only)?"""
    if line_start <= 0:
        return True
    with open(path, "rb") as f:
        end = line_start - 1  # offset of the previous line's '\n'
        lo = end
        buf = b""
        while lo > 0:
            step = min(lo, 1 << 16)
            lo -= step
            f.seek(lo)
            buf = f.read(step) + buf
            j = buf.rfind(b"\n", 0, end - lo)
            if j >= 0:
                return not buf[j + 1 : end - lo].strip()
        return not buf[:end].strip()


def _lines(unit, stats, on_error) -> Iterator[tuple[bytes, int]]:
    """The lines a line-oriented unit owns: ``(line, index_in_unit)``."""
    if unit.end is None:
        yield from _iter_compressed_lines(unit.path, stats, on_error)
        return
    for line, pos, i in _iter_range_lines(unit.path, unit.start):
        if pos >= unit.end:
            return
        yield line, i


def read_txt(unit, mode: str, stats: ReadStats, on_error: str) -> Iterator[str]:
    if mode == "line":
        for line, _ in _lines(unit, stats, on_error):
            stats.docs_read += 1
            yield _decode(line, stats)
        return
    # block mode: a document is a maximal run of non-blank lines, owned by the unit in
    # which its first line starts
    if unit.end is None:
        src = ((line, 0) for line, _ in _iter_compressed_lines(unit.path, stats, on_error))
        skip_tail, end = False, None
    else:
        src = ((line, pos) for line, pos, _ in _iter_range_lines(unit.path, unit.start))
        with open(unit.path, "rb") as f:
            first = _first_line_start(f, unit.start)
        skip_tail, end = not _prev_line_blank(unit.path, first), unit.end
    block: list[bytes] = []
    for line, pos in src:
        blank = not line.strip()
        if skip_tail:  # tail of a block that started in the previous unit
            skip_tail = not blank
            continue
        if blank:
            if block:
                stats.docs_read += 1
                yield _decode(b"\n".join(block), stats)
                block = []
            continue
        if not block and end is not None and pos >= end:
            break  # this block starts in the next unit
        block.append(line)
    if block:
        stats.docs_read += 1
        yield _decode(b"\n".join(block), stats)


def read_jsonl(unit, field_name: str, stats: ReadStats, on_error: str) -> Iterator[str]:
    counter = _LineCounter(unit.path, unit.start if unit.end is not None else 0)
    loads = json.loads
    for line, i in _lines(unit, stats, on_error):
        if not line.strip():
            continue  # blank lines are not records
        stats.docs_read += 1
        text = _decode(line, stats)
        if i == 0 and text.startswith("\ufeff"):
            text = text[1:]  # a UTF-8 byte-order mark on the first line
        try:
            rec = loads(text)
        except ValueError as e:
            msg = f"{where(unit.path, counter.line(i))}: not valid JSON ({e})"
        else:
            val = rec.get(field_name) if isinstance(rec, dict) else None
            if isinstance(val, str):
                yield val
                continue
            if not isinstance(rec, dict):
                msg = f"{where(unit.path, counter.line(i))}: not a JSON object (got {type(rec).__name__})"
            elif field_name not in rec:
                msg = (
                    f"{where(unit.path, counter.line(i))}: no field {field_name!r} "
                    f"(fields: {', '.join(sorted(rec)[:8])}; set --text-field)"
                )
            else:
                msg = f"{where(unit.path, counter.line(i))}: field {field_name!r} is {type(val).__name__}, not a string"
        if on_error == "fail":
            raise DataPipelineError(msg)
        stats.skipped(msg)


def read_parquet(unit, field_name: str, stats: ReadStats, on_error: str, batch_rows: int = 8192) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(unit.path)
    except (pa.ArrowException, OSError) as e:
        raise DataPipelineError(f"{unit.path}: cannot read parquet ({e})") from None
    if field_name not in pf.schema_arrow.names:
        raise DataPipelineError(
            f"{unit.path}: no column {field_name!r} (columns: {', '.join(pf.schema_arrow.names[:8])}; set --text-field)"
        )
    row = sum(pf.metadata.row_group(g).num_rows for g in range(unit.start))
    try:
        for batch in pf.iter_batches(
            batch_size=batch_rows, row_groups=list(range(unit.start, unit.end)), columns=[field_name]
        ):
            col = batch.column(0)
            if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
                raise DataPipelineError(f"{unit.path}: column {field_name!r} has type {col.type}, not string")
            for j, val in enumerate(col.to_pylist()):
                stats.docs_read += 1
                if val is None:
                    msg = f"{unit.path}: row {row + j}: null {field_name!r}"
                    if on_error == "fail":
                        raise DataPipelineError(msg)
                    stats.skipped(msg)
                    continue
                yield val
            row += len(col)
    except (pa.ArrowException, OSError) as e:
        msg = f"{unit.path}: row {row}: corrupt parquet data ({e})"
        if on_error == "fail":
            raise DataPipelineError(msg) from None
        stats.corrupt_files += 1
        stats.skipped(msg)


def _text_of(row, field_name, src, i, stats, on_error):
    val = row.get(field_name) if isinstance(row, dict) else None
    if isinstance(val, str):
        return val
    msg = (
        f"{src}: row {i}: no field {field_name!r}"
        if not isinstance(row, dict) or field_name not in row
        else f"{src}: row {i}: field {field_name!r} is {type(val).__name__}, not a string"
    )
    if on_error == "fail":
        raise DataPipelineError(msg)
    stats.skipped(msg)
    return None


def load_saved_dataset(path: str, split: str | None):
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as e:  # datasets raises several types here
        raise DataPipelineError(f"{path}: cannot load datasets folder ({type(e).__name__}: {e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataPipelineError(f"{path}: no split {split!r} (has {', '.join(ds)}); use {path}@SPLIT")
        ds = ds[split]
    return ds


def load_hub_dataset(name: str, config: str | None, split: str | None):
    """A streaming (``IterableDataset``) view of a hub dataset (or anything ``load_dataset`` takes)."""
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, missing dataset, bad config: all user-facing
        raise DataPipelineError(f"hf:{name}: cannot open dataset ({type(e).__name__}: {e})") from None


def read_hf_disk(unit, field_name, stats, on_error, batch_rows: int = 2048) -> Iterator[str]:
    ds = load_saved_dataset(unit.path, unit.split)
    if field_name not in ds.column_names:
        raise DataPipelineError(f"{unit.path}: no column {field_name!r} (columns: {', '.join(ds.column_names[:8])})")
    for off in range(unit.start, unit.end, batch_rows):
        vals = ds[off : min(off + batch_rows, unit.end)][field_name]
        for j, val in enumerate(vals):
            stats.docs_read += 1
            if isinstance(val, str):
                yield val
            else:
                _text_of({field_name: val}, field_name, unit.path, off + j, stats, on_error)


def read_hf_hub(unit, field_name, stats, on_error) -> Iterator[str]:
    ds = load_hub_dataset(unit.path, unit.config, unit.split)
    if unit.end > 1:
        ds = ds.shard(num_shards=unit.end, index=unit.start)
    src = f"hf:{unit.path} shard {unit.start}"
    for i, row in enumerate(ds):
        stats.docs_read += 1
        t = _text_of(row, field_name, src, i, stats, on_error)
        if t is not None:
            yield t


def iter_docs(unit, cfg, stats: ReadStats) -> Iterator[str]:
    """Raw document texts of one unit, in input order."""
    if unit.kind == "txt":
        return read_txt(unit, cfg.txt_mode, stats, cfg.on_error)
    if unit.kind == "jsonl":
        return read_jsonl(unit, cfg.text_field, stats, cfg.on_error)
    if unit.kind == "parquet":
        return read_parquet(unit, cfg.text_field, stats, cfg.on_error)
    if unit.kind == "hf_disk":
        return read_hf_disk(unit, cfg.text_field, stats, cfg.on_error)
    if unit.kind == "hf_hub":
        return read_hf_hub(unit, cfg.text_field, stats, cfg.on_error)
    raise DataPipelineError(f"unknown unit kind {unit.kind!r}")
