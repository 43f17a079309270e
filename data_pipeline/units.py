"""Cutting the work into units, and the per-unit done-markers.

A unit is the smallest piece of work: a whole file, a byte range of a big plain
``.txt``/``.jsonl`` file, a range of parquet row groups, a row range of a ``save_to_disk``
dataset, or one shard of a streaming hub dataset.  Units are planned deterministically from
the inputs and the config alone, and sequences are packed per unit, so the shards a unit
writes depend only on that unit: not on how many workers run, nor on which unit ran first.

Done-markers: ``<out>/_work/units/<name>.json`` holds a finished unit's result (its shard
records and counters).  It is written atomically and *last*, after every shard of the unit
has been renamed into place, so its presence means the unit is complete.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import DataPipelineError
from .readers import SEEKABLE_EXTS, Source, load_hub_dataset, load_saved_dataset

MB = 1 << 20


@dataclass(frozen=True)
class Unit:
    index: int
    name: str  # "u000012": shard and key prefix (no dots)
    kind: str  # reader kind, see readers.iter_docs
    path: str
    start: int = 0  # byte offset / first row group / first row / shard index
    end: int | None = None  # exclusive end; None = whole file; hub: number of shards
    est_bytes: int = 0  # input size estimate (progress bar)
    config: str | None = None
    split: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Unit:
        return cls(**d)

    def describe(self) -> str:
        if self.kind == "hf_hub":
            return f"hf:{self.path} shard {self.start}/{self.end}"
        if self.end is None:
            return self.path
        what = {"txt": "bytes", "jsonl": "bytes", "parquet": "row groups", "hf_disk": "rows"}[self.kind]
        return f"{self.path} [{what} {self.start}:{self.end}]"


def _pieces(source: Source, unit_bytes: int) -> list[dict]:
    """The units of one source, as dicts without index/name."""
    base = {"kind": source.kind, "path": source.path, "config": source.config, "split": source.split}
    if source.kind in ("txt", "jsonl"):
        if source.path.lower().endswith(SEEKABLE_EXTS) and source.size > unit_bytes:
            n = math.ceil(source.size / unit_bytes)
            step = math.ceil(source.size / n)
            return [
                dict(base, start=s, end=min(s + step, source.size), est_bytes=min(step, source.size - s))
                for s in range(0, source.size, step)
            ]
        # compressed streams cannot be split without reading them: one unit per file
        return [dict(base, start=0, end=None, est_bytes=source.size)]
    if source.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            md = pq.ParquetFile(source.path).metadata
        except Exception as e:
            raise DataPipelineError(f"{source.path}: cannot read parquet metadata ({e})") from None
        out, first, acc = [], 0, 0
        for g in range(md.num_row_groups):
            acc += md.row_group(g).total_byte_size
            if acc >= unit_bytes or g == md.num_row_groups - 1:
                out.append(dict(base, start=first, end=g + 1, est_bytes=acc))
                first, acc = g + 1, 0
        return out
    if source.kind == "hf_disk":
        ds = load_saved_dataset(source.path, source.split)
        n = len(ds)
        nbytes = int(getattr(ds.data, "nbytes", 0) or 0)
        k = max(1, math.ceil(nbytes / unit_bytes)) if nbytes else 1
        step = max(1, math.ceil(n / k)) if n else 1
        return [
            dict(base, start=s, end=min(s + step, n), est_bytes=nbytes * (min(s + step, n) - s) // max(n, 1))
            for s in range(0, n, step)
        ]
    if source.kind == "hf_hub":
        ds = load_hub_dataset(source.path, source.config, source.split)
        n = max(1, int(getattr(ds, "num_shards", None) or getattr(ds, "n_shards", 1) or 1))
        return [dict(base, start=i, end=n, est_bytes=0) for i in range(n)]
    raise DataPipelineError(f"unknown source kind {source.kind!r}")


def plan(sources: list[Source], unit_mb: float) -> list[Unit]:
    unit_bytes = max(1, int(unit_mb * MB))
    pieces = [p for s in sources for p in _pieces(s, unit_bytes)]
    width = max(6, len(str(len(pieces) - 1)))
    return [Unit(index=i, name=f"u{i:0{width}d}", **p) for i, p in enumerate(pieces)]


# --------------------------------------------------------------------------- done-markers


def result_path(work_dir: Path, unit: Unit) -> Path:
    return Path(work_dir) / "units" / f"{unit.name}.json"


def read_result(work_dir: Path, unit: Unit) -> dict | None:
    """The unit's stored result, or None if the unit is not finished."""
    p = result_path(work_dir, unit)
    if not p.is_file():
        return None
    try:
        res = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None  # cannot happen with atomic writes; treat as unfinished and redo
    if res.get("unit") != unit.to_dict():
        raise DataPipelineError(
            f"{p}: done-marker is for a different unit ({res.get('unit')}); the output folder belongs to another plan"
        )
    return res
