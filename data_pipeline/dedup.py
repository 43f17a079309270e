"""Global exact deduplication (``dedup="global"``): a hash pass, then a resolution.

Removing a document because an *earlier unit* holds the same text makes units depend on
each other, so it is done in two extra, deterministic steps before the units are built:

1. :func:`hash_unit` (per unit, parallel, idempotent): the sorted unique 64-bit hashes of
   the unit's documents that pass the empty/short filters -> ``_work/hashes/<unit>.npy``.
2. :func:`resolve_duplicates` (once): for every unit, the hashes that also occur in a unit
   with a lower index -> ``_work/dups/<unit>.npy`` (usually small).  Done by hash bucket,
   so memory stays bounded by ``bucket_hashes``, not by the corpus.

``run_unit`` then drops a document whose hash is in its unit's list (the first occurrence,
in unit order, survives) as well as repeats inside the unit.  The hash is the first 8 bytes
of the same blake2b digest that draws the train/validation split: at 10^9 documents the
expected number of documents dropped by a 64-bit collision is about 0.03.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files import atomic_path

from .config import as_config
from .documents import DocFilter
from .errors import DataPipelineError
from .readers import ReadStats, iter_docs

_BUCKET_BITS_MAX = 12


def hashes_path(cfg, unit) -> Path:
    return cfg.work_dir / "hashes" / f"{unit.name}.npy"


def dups_path(cfg, unit) -> Path:
    return cfg.work_dir / "dups" / f"{unit.name}.npy"


def _save_atomic(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, arr)


def hash_unit(cfg, unit) -> Path:
    """Write the unit's sorted unique document hashes (skips if already there)."""
    cfg = as_config(cfg)
    p = hashes_path(cfg, unit)
    if p.is_file():
        return p
    filt = DocFilter(cfg, dedup=False)
    hs = np.fromiter(
        (int.from_bytes(d[:8], "little") for _, d in filt.kept(iter_docs(unit, cfg, ReadStats()))), dtype=np.uint64
    )
    _save_atomic(p, np.unique(hs))
    return p


def resolve_duplicates(cfg, units, bucket_hashes: int = 50_000_000) -> None:
    """Write every unit's list of hashes already held by an earlier unit."""
    cfg = as_config(cfg)
    missing = [u.name for u in units if not hashes_path(cfg, u).is_file()]
    if missing:
        raise DataPipelineError(
            f"{cfg.out}: {len(missing)} units not hashed yet ({', '.join(missing[:5])}); "
            "run the hash pass first (`python -m data_pipeline hash-units --all`)"
        )
    if all(dups_path(cfg, u).is_file() for u in units):
        return
    sizes = [np.load(hashes_path(cfg, u), mmap_mode="r").shape[0] for u in units]
    bits = 0
    while (sum(sizes) >> bits) > bucket_hashes and bits < _BUCKET_BITS_MAX:
        bits += 1
    dups: list[list[np.ndarray]] = [[] for _ in units]
    for b in range(1 << bits):
        hs, owner = [], []
        for i, u in enumerate(units):
            h = np.load(hashes_path(cfg, u), mmap_mode="r")
            if bits:
                # sorted input: the bucket (top bits) is a contiguous slice
                lo = np.searchsorted(h, np.uint64(b) << np.uint64(64 - bits))
                hi = np.searchsorted(h, np.uint64(b + 1) << np.uint64(64 - bits)) if b + 1 < (1 << bits) else h.shape[0]
                h = h[lo:hi]
            hs.append(np.asarray(h))
            owner.append(np.full(h.shape[0], i, dtype=np.int64))
        if not hs:
            continue
        h = np.concatenate(hs)
        o = np.concatenate(owner)
        order = np.lexsort((o, h))  # by hash, then by unit
        h, o = h[order], o[order]
        repeat = np.zeros(h.shape[0], dtype=bool)
        repeat[1:] = h[1:] == h[:-1]  # not the first (lowest-unit) occurrence
        for i in np.unique(o[repeat]):
            dups[i].append(h[repeat & (o == i)])
    for i, u in enumerate(units):
        arr = np.sort(np.concatenate(dups[i])) if dups[i] else np.empty(0, dtype=np.uint64)
        _save_atomic(dups_path(cfg, u), arr.astype(np.uint64))


def load_drop_set(cfg, unit) -> set[int]:
    p = dups_path(cfg, unit)
    if not p.is_file():
        raise DataPipelineError(
            f"{p}: missing; with dedup=global, run the hash pass and resolve_duplicates "
            "before the units (`build` does it; or `hash-units --all` then `resolve-duplicates`)"
        )
    return set(np.load(p).tolist())
