"""Reading a finished build back: per-unit documents, and a full consistency check.

Used by the tests and by ``inspect --verify``; also handy for users who want to be sure
that what is on disk is what the manifest says.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from common.files import sha256_file

from .errors import DataPipelineError
from .packing import unpack
from .shards import iter_shard, shard_urls


def split_sequences(manifest: dict, split: str) -> dict[str, list[np.ndarray]]:
    """``{unit_name: [sequence, ...]}`` in manifest order (keys say which unit wrote what)."""
    out: dict[str, list[np.ndarray]] = {}
    for url in shard_urls(manifest, split):
        for key, ids in iter_shard(url, manifest["seq_len"]):
            out.setdefault(key.rsplit("-", 1)[0], []).append(ids)
    return out


def split_documents(manifest: dict, split: str) -> list[list[int]]:
    """Every document of a split, as token ids, in input order (``concat`` packing), or
    every sequence's content (``single`` packing, see ``packing.unpack``)."""
    sp = manifest["special_ids"]
    docs: list[list[int]] = []
    for seqs in split_sequences(manifest, split).values():
        docs.extend(unpack(seqs, sp["cls"], sp["sep"], sp["pad"], manifest["packing"]))
    return docs


def verify_build(manifest: dict) -> list[str]:
    """Problems found (empty list = consistent): files vs manifest hashes, sample and token
    counts, key order and uniqueness, no stray or temporary shard files."""
    problems: list[str] = []
    root = Path(manifest["_root"])
    pad = manifest["special_ids"]["pad"]
    listed = set()
    for split, info in manifest["splits"].items():
        tot_s = tot_t = 0
        keys_seen: set[str] = set()
        for sh in info["shards"]:
            p = root / sh["path"]
            listed.add(p.resolve())
            if not p.is_file():
                problems.append(f"{sh['path']}: missing")
                continue
            if sha256_file(p) != sh["sha256"]:
                problems.append(f"{sh['path']}: sha256 mismatch")
            n = t = 0
            try:
                for key, ids in iter_shard(p, manifest["seq_len"]):
                    if key in keys_seen:
                        problems.append(f"{sh['path']}: duplicate key {key}")
                    keys_seen.add(key)
                    n += 1
                    t += int((ids != pad).sum())
            except DataPipelineError as e:
                problems.append(str(e))
            if n != sh["samples"] or t != sh["tokens"]:
                problems.append(
                    f"{sh['path']}: {n} samples / {t} tokens, manifest says {sh['samples']} / {sh['tokens']}"
                )
            tot_s += n
            tot_t += t
        if tot_s != info["samples"] or tot_t != info["tokens"]:
            problems.append(f"split {split}: totals differ from manifest")
        d = root / split
        if d.is_dir():
            for p in d.iterdir():
                if p.resolve() not in listed:
                    problems.append(f"{split}/{p.name}: on disk but not in the manifest")
    return problems
