"""The shard format: the single place where it is defined.

Layout of a build's output folder::

    manifest.json        # written last, atomically, by finalize()
    tokenizer.json       # the tokenizer used (its sha256 is in the manifest)
    train/{unit}-{k:05d}.tar
    validation/{unit}-{k:05d}.tar

Format 2 (written since issue 17): each tar is plain (uncompressed) webdataset input whose samples are
*blocks* of up to ``block_sequences`` packed sequences: ``__key__ = f"{unit}-{first:08d}"`` (the unit's
index of the block's first sequence; no dots) and one member ``{key}.ids.npy``, a ``.npy`` (version 1.0)
array of shape ``(n, seq_len)``, ``<u2`` (``<u4`` when the vocabulary does not fit in 16 bits). Every
block of a shard holds ``block_sequences`` sequences except a unit's last one; a reader needs only the
``.npy`` header (128 bytes) to skip a block. About 2.0 bytes per uint16 id on disk, where format 1 (one
member ``{key}.ids.u16`` per sequence, a 512-byte header and padding each) took 8.

Tars are byte-deterministic: fixed mtime/uid/gid/mode, USTAR headers, members in sequence order, blocks
cut at fixed sequence counts, so a re-run of a unit reproduces its shards bit for bit. Both formats are
read (the member's suffix says which); only format 2 is written.

Readers (``pretrain``) use :func:`read_manifest`, :func:`shard_urls` and :func:`read_shard` (checked,
seekable); plain webdataset works too, one block per sample::

    m = read_manifest("out/")
    ds = webdataset.WebDataset(shard_urls(m, "train"), shardshuffle=False).map(decode_block)  # int64 (n, seq_len)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from common.files import sha256_file

from .errors import DataPipelineError

FORMAT_VERSION = 2  # written; 1 (one member per sequence) is still read
READABLE_FORMATS = (1, 2)
BLOCK_SEQUENCES = 1024  # default sequences per tar member (see docs/data_pipeline.md for the measurement)
BLOCK_FIELD = "ids.npy"
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "validation")
DTYPES = {"uint16": ("u16", np.dtype("<u2")), "uint32": ("u32", np.dtype("<u4"))}
FIELD_TO_DTYPE = {"ids." + ext: dt for ext, dt in DTYPES.values()}
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
_BLOCK = tarfile.BLOCKSIZE  # 512
_MTIME = 0  # fixed so that tars are byte-identical across runs


# --------------------------------------------------------------------------- dtype / names


def dtype_for_vocab(vocab_size: int) -> str:
    """``"uint16"`` when every id fits in 16 bits, else ``"uint32"``."""
    if vocab_size <= 0:
        raise DataPipelineError(f"vocab_size must be positive, got {vocab_size}")
    return "uint16" if vocab_size <= 65536 else "uint32"


def sample_key(unit_name: str, seq_index: int) -> str:
    return f"{unit_name}-{seq_index:08d}"


def shard_relpath(split: str, unit_name: str, k: int) -> str:
    return f"{split}/{unit_name}-{k:05d}.tar"


def check_unit_name(name: str) -> None:
    if not name or "." in name or "/" in name or len(name) > 60:
        raise DataPipelineError(f"invalid unit name {name!r}: must be non-empty, <= 60 chars, no '.' or '/'")


# --------------------------------------------------------------------------- manifest


def read_manifest(path_or_dir: str | os.PathLike) -> dict:
    """Load and validate ``manifest.json`` (give the file or the build folder).

    The returned dict is the file's content plus ``"_root"``: the absolute folder that
    shard paths are relative to (not stored in the file, so outputs can be moved).
    """
    p = Path(path_or_dir)
    if p.is_dir():
        p = p / MANIFEST_NAME
    if not p.is_file():
        hint = " (is the build finished? run `python -m data_pipeline finalize`)" if p.parent.is_dir() else ""
        raise DataPipelineError(f"{p}: manifest not found{hint}")
    try:
        m = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPipelineError(f"{p}: corrupt manifest, not valid JSON ({e})") from None
    problem = _manifest_problem(m)
    if problem:
        raise DataPipelineError(f"{p}: invalid manifest: {problem}")
    m["_root"] = str(p.parent.resolve())
    return m


def _manifest_problem(m: Any) -> str | None:
    if not isinstance(m, dict):
        return "top level is not an object"
    if m.get("format_version") not in READABLE_FORMATS:
        return (
            f"format_version is {m.get('format_version')!r}, this reader knows {list(READABLE_FORMATS)}; "
            "rebuild the shards with this version (`python -m data_pipeline build ...`)"
        )
    if m["format_version"] >= 2 and not (isinstance(m.get("block_sequences"), int) and m["block_sequences"] > 0):
        return "missing or mistyped field 'block_sequences'"
    for k, t in (
        ("seq_len", int),
        ("vocab_size", int),
        ("dtype", str),
        ("tokenizer", dict),
        ("special_ids", dict),
        ("packing", str),
        ("splits", dict),
    ):
        if not isinstance(m.get(k), t):
            return f"missing or mistyped field {k!r}"
    if m["dtype"] not in DTYPES:
        return f"dtype {m['dtype']!r} is not one of {sorted(DTYPES)}"
    if m["dtype"] != dtype_for_vocab(m["vocab_size"]) and m["dtype"] != "uint32":
        return f"dtype {m['dtype']} cannot hold vocab_size {m['vocab_size']}"
    if m["packing"] not in ("concat", "single"):
        return f"packing {m['packing']!r} is not 'concat' or 'single'"
    missing = [s for s in SPECIAL_NAMES if not isinstance(m["special_ids"].get(s), int)]
    if missing:
        return f"special_ids lacks {missing}"
    for split, s in m["splits"].items():
        if not isinstance(s, dict) or not isinstance(s.get("shards"), list):
            return f"split {split!r} has no shard list"
        for sh in s["shards"]:
            if not isinstance(sh, dict) or not all(k in sh for k in ("path", "samples", "tokens", "sha256")):
                return f"split {split!r} has a malformed shard entry {sh!r}"
    return None


def shard_urls(manifest: dict, split: str) -> list[str]:
    """Absolute paths of a split's shards, in manifest (= unit, then shard) order."""
    if split not in manifest.get("splits", {}):
        raise DataPipelineError(f"split {split!r} not in manifest (has {sorted(manifest.get('splits', {}))})")
    root = Path(manifest.get("_root") or ".").resolve()
    return [str(root / sh["path"]) for sh in manifest["splits"][split]["shards"]]


# --------------------------------------------------------------------------- decoding


def _corrupt(where_: str, what: str) -> DataPipelineError:
    return DataPipelineError(f"{where_}: {what}; the shard is corrupt; rebuild or restore it")


def _block_header(f, where_: str, seq_len: int | None) -> tuple[int, np.dtype]:
    """Read a ``.npy`` block's header from `f` (left at the first id): (sequences, dtype), checked."""
    try:
        version = np.lib.format.read_magic(f)
        if version != (1, 0):
            raise ValueError(f"npy version {version}, expected (1, 0)")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
    except (ValueError, SyntaxError, EOFError) as e:
        raise _corrupt(where_, f"not a .npy block ({e})") from None
    if dtype.str not in ("<u2", "<u4") or fortran or len(shape) != 2 or shape[0] < 1:
        raise _corrupt(
            where_,
            f".npy block of {dtype.str} {shape}{' (fortran order)' if fortran else ''}, "
            "expected little-endian uint16/uint32 (sequences, seq_len)",
        )
    if seq_len is not None and shape[1] != seq_len:
        raise _corrupt(where_, f"{shape[1]} ids per sequence, expected seq_len={seq_len}")
    return shape[0], dtype


def _block_body(f, n: int, dtype: np.dtype, where_: str, seq_len: int | None) -> np.ndarray:
    """The ids after a block's header -> int64 (n, seq_len)."""
    raw = f.read()
    width = seq_len if seq_len is not None else len(raw) // max(n * dtype.itemsize, 1)
    if len(raw) != n * width * dtype.itemsize or width == 0:
        raise _corrupt(where_, f"{len(raw)} bytes of ids, the header says {n} sequences of {dtype.str}")
    return np.frombuffer(raw, dtype=dtype).reshape(n, width).astype(np.int64)


def _legacy_row(raw: bytes, field: str, where_: str, seq_len: int | None) -> np.ndarray:
    """Format 1: one sequence as raw little-endian bytes -> int64 (1, seq_len)."""
    dt = FIELD_TO_DTYPE[field]
    if len(raw) == 0 or len(raw) % dt.itemsize:
        raise DataPipelineError(f"{where_}: {len(raw)} bytes is not a whole number of {dt.name} ids")
    ids = np.frombuffer(raw, dtype=dt).astype(np.int64)
    if seq_len is not None and ids.shape[0] != seq_len:
        raise DataPipelineError(f"{where_}: {ids.shape[0]} ids, expected seq_len={seq_len}")
    return ids[None]


def _unknown_field(where_: str, fields) -> DataPipelineError:
    return DataPipelineError(
        f"{where_}: expected exactly one of {[BLOCK_FIELD, *sorted(FIELD_TO_DTYPE)]}, found fields {sorted(fields)}"
    )


def decode_block(sample: dict, seq_len: int | None = None) -> np.ndarray:
    """A webdataset sample (dict with ``ids.npy`` bytes, or format 1's ``ids.u16``/``ids.u32``) -> int64
    ids of shape ``(sequences, seq_len)``. With ``seq_len`` the length is checked too. Raises
    :class:`DataPipelineError` naming the sample's key and shard on a malformed sample."""
    key = sample.get("__key__", "?") if isinstance(sample, dict) else "?"
    src = sample.get("__url__", "") if isinstance(sample, dict) else ""
    where_ = f"{src}: sample {key!r}" if src else f"sample {key!r}"
    if not isinstance(sample, dict):
        raise DataPipelineError(f"{where_}: expected a dict, got {type(sample).__name__}")
    fields = [f for f in (BLOCK_FIELD, *FIELD_TO_DTYPE) if f in sample]
    if len(fields) != 1:
        raise _unknown_field(where_, (k for k in sample if not k.startswith("__")))
    raw = sample[fields[0]]
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DataPipelineError(
            f"{where_}: field {fields[0]} is {type(raw).__name__}, expected raw bytes "
            "(open the dataset without a decoder)"
        )
    if fields[0] != BLOCK_FIELD:
        return _legacy_row(bytes(raw), fields[0], where_, seq_len)
    f = io.BytesIO(raw)
    n, dtype = _block_header(f, where_, seq_len)
    return _block_body(f, n, dtype, where_, seq_len)


def _blocks(
    tf: tarfile.TarFile, path: str, seq_len: int | None, start: int = 0
) -> Iterator[tuple[str, int, int, np.ndarray | None]]:
    """``(member name, index of its first sequence in the shard, sequences, ids)`` per member, in order;
    ids is None for a block that ends before sample `start`: only its header is read, its ids are not
    decoded (their bytes still stream through the reader, and its hash)."""
    index = 0
    for member in tf:
        if not member.isfile():
            continue
        field = member.name.partition(".")[2]
        where_ = f"{path}: member {member.name!r}"
        f = tf.extractfile(member)
        if field == BLOCK_FIELD:
            n, dtype = _block_header(f, where_, seq_len)
            ids = _block_body(f, n, dtype, where_, seq_len) if index + n > start else None
        elif field in FIELD_TO_DTYPE:  # format 1: one member per sequence
            n = 1
            ids = _legacy_row(f.read(), field, f"{where_} (sample {index})", seq_len) if index >= start else None
        else:
            raise _unknown_field(where_, [field])
        yield member.name, index, n, ids
        index += n


class _HashingReader:
    """A file read front to back, hashed on the way (tarfile's stream mode reads it in order)."""

    def __init__(self, f) -> None:
        self.f, self.hash = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.hash.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.hash.hexdigest()


def check_ids(ids: np.ndarray, vocab_size: int, where_: str, first: int = 0) -> None:
    """Every id of a block (int64, (n, seq_len)) must be < vocab_size: a corrupt id would index past the
    embedding table. `first` is the shard's index of the block's first sequence (named on failure)."""
    bad = ids >= vocab_size
    if bad.any():
        row, position = divmod(int(np.argmax(bad.ravel())), ids.shape[1])
        raise DataPipelineError(
            f"{where_} (sample {first + row}): id {int(ids[row, position])} at position "
            f"{position} is outside the vocabulary ({vocab_size} ids): the shard is corrupt; "
            "rebuild or restore it"
        )


def read_shard(
    path: str | os.PathLike,
    *,
    seq_len: int | None = None,
    vocab_size: int | None = None,
    sha256: str | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the ids (int64, one sequence each) of a shard's samples [start, stop) (to the end without
    `stop`), in order, checked: the length (`seq_len`), every id of each decoded block against the
    vocabulary (`vocab_size`), and the whole file against the manifest's `sha256`, hashed as it is read
    (blocks before `start` pass through the hash but are not decoded; after `stop` the rest of the file is
    read too). The last sample is yielded only once the hash matched, so a reader that buffers what it
    reads (pretrain's shuffle chunks) never hands out a sample of a corrupt shard. Errors are one
    DataPipelineError line naming the shard, the member and the sample index. Reads formats 1 and 2."""
    path = str(path)
    if start < 0 or (stop is not None and stop <= start):
        return
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        pending, index = None, 0
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for name, first, n, ids in _blocks(tf, path, seq_len, start):
                    index = first + n
                    if ids is None:
                        continue
                    if vocab_size is not None:
                        check_ids(ids, vocab_size, f"{path}: member {name!r}", first)
                    for row in ids[max(start - first, 0) : n if stop is None else min(n, stop - first)]:
                        if pending is not None:
                            yield pending
                        pending = row
                    if stop is not None and index >= stop:
                        break
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataPipelineError(
                f"{path}: unreadable tar after sample {index} ({type(e).__name__}: {e}); "
                "the shard is corrupt or truncated; rebuild or restore it"
            ) from None
        needed = start if stop is None else stop
        if index < needed:
            raise DataPipelineError(f"{path}: {index} samples, but the manifest says at least {needed}")
        if sha256 is not None:
            digest = reader.drain()
            if digest != sha256:
                raise DataPipelineError(
                    f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                    f"{sha256[:16]}...: the shard is corrupt; rebuild or restore it"
                )
    if pending is not None:
        yield pending


def iter_shard(path: str | os.PathLike, seq_len: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(key, ids)`` per sequence of one shard, unchecked, with the standard library (no webdataset
    needed); a sequence's key is ``sample_key(unit, index in the unit)`` in both formats."""
    with tarfile.open(path, "r:") as tf:
        for name, _, _, ids in _blocks(tf, str(path), seq_len):
            unit, _, first = name.partition(".")[0].rpartition("-")
            if not first.isdigit():
                raise DataPipelineError(f"{path}: member {name!r} is not named {{unit}}-{{index:08d}}.{BLOCK_FIELD}")
            for row, sequence in enumerate(ids):
                yield sample_key(unit, int(first) + row), sequence


# --------------------------------------------------------------------------- writing


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, _MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def block_bytes(rows: np.ndarray) -> bytes:
    """A block's ``.npy`` bytes (version 1.0, no pickle: the same bytes for the same rows)."""
    buf = io.BytesIO()
    np.lib.format.write_array(buf, rows, version=(1, 0), allow_pickle=False)
    return buf.getvalue()


class ShardWriter:
    """Writes one unit's sequences of one split into size-capped, deterministic tar shards (format 2).

    Sequences are cut into blocks of ``block_sequences`` (the unit's last block may be shorter), one
    ``.npy`` tar member each; a shard takes whole blocks while it stays under ``shard_bytes`` (and at
    least one). Each shard is written as ``<final>.tmp`` and renamed to its final name only once it is
    complete (flushed and fsynced), so a killed process never leaves a truncated ``.tar``.
    ``close()`` returns the shard records ``{"path", "samples", "tokens", "sha256", "bytes"}``.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        split: str,
        unit_name: str,
        dtype: str,
        seq_len: int,
        pad_id: int,
        shard_bytes: int,
        *,
        block_sequences: int = BLOCK_SEQUENCES,
        on_shard_done=None,
    ):
        check_unit_name(unit_name)
        if dtype not in DTYPES:
            raise DataPipelineError(f"unknown dtype {dtype!r}")
        if block_sequences < 1:
            raise DataPipelineError(f"block_sequences must be >= 1, got {block_sequences}")
        self.out_dir, self.split, self.unit_name = Path(out_dir), split, unit_name
        self.np_dtype = DTYPES[dtype][1]
        self.seq_len, self.pad_id = seq_len, pad_id
        self.block_sequences = block_sequences
        self.shard_bytes = max(int(shard_bytes), 1)
        self.on_shard_done = on_shard_done  # test/debug hook: called with the record after each rename
        self.records: list[dict] = []
        self.seq_index = 0  # sequences of the unit already in blocks
        self._held = np.zeros((0, seq_len), dtype=self.np_dtype)  # fewer than block_sequences, not yet written
        self._k = 0
        self._tar = None
        (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    # -- one shard file
    def _open(self):
        rel = shard_relpath(self.split, self.unit_name, self._k)
        self._rel, self._final = rel, self.out_dir / rel
        self._tmp = self._final.with_name(self._final.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._f, mode="w", format=tarfile.USTAR_FORMAT)
        self._bytes = self._samples = self._tokens = 0

    def _finish(self):
        self._tar.close()  # end of archive: two zero blocks, padded to a whole 10 KiB record
        self._tar = None
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self._tmp, self._final)
        rec = {
            "path": self._rel,
            "samples": self._samples,
            "tokens": self._tokens,
            "sha256": sha256_file(self._final),
            "bytes": self._final.stat().st_size,
        }
        self.records.append(rec)
        self._k += 1
        if self.on_shard_done is not None:
            self.on_shard_done(rec)

    def _add_block(self, rows: np.ndarray) -> None:
        if self.seq_index + rows.shape[0] > 10**8:
            raise DataPipelineError(f"unit {self.unit_name}: more than 10**8 sequences; use a smaller unit_mb")
        data = block_bytes(rows)
        member = _BLOCK + -(-len(data) // _BLOCK) * _BLOCK
        # a block joins the shard if the shard is empty or the shard still fits under the target with it
        if self._tar is not None and self._samples and self._bytes + member + 2 * _BLOCK > self.shard_bytes:
            self._finish()
        if self._tar is None:
            self._open()
        name = f"{sample_key(self.unit_name, self.seq_index)}.{BLOCK_FIELD}"
        self._tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
        self._bytes += member
        self._samples += rows.shape[0]
        self._tokens += int((rows != self.pad_id).sum())
        self.seq_index += rows.shape[0]

    def write(self, seqs: np.ndarray) -> None:
        """Append a ``(n, seq_len)`` array of packed sequences (any integer dtype). Blocks are cut at
        fixed sequence counts, so the output does not depend on how the sequences are batched."""
        seqs = np.asarray(seqs)
        if seqs.ndim != 2 or seqs.shape[1] != self.seq_len:
            raise ValueError(f"expected (n, {self.seq_len}) sequences, got {seqs.shape}")
        seqs = np.concatenate([self._held, seqs.astype(self.np_dtype, copy=False)])
        full = seqs.shape[0] - seqs.shape[0] % self.block_sequences
        for i in range(0, full, self.block_sequences):
            self._add_block(seqs[i : i + self.block_sequences])
        self._held = seqs[full:].copy()

    def close(self) -> list[dict]:
        if self._held.shape[0]:
            self._add_block(self._held)
            self._held = self._held[:0]
        if self._tar is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (its .tmp file); finished shards stay."""
        if self._tar is not None:
            self._f.close()
            self._tar = None
            self._tmp.unlink(missing_ok=True)
