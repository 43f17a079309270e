"""The shard format: the single place where it is defined.

Layout of a build's output folder::

    manifest.json        # written last, atomically, by finalize()
    tokenizer.json       # the tokenizer used (its sha256 is in the manifest)
    train/{unit}-{k:05d}.tar
    validation/{unit}-{k:05d}.tar

Each tar is plain (uncompressed) webdataset input: one sample per packed sequence,
``__key__ = f"{unit}-{seq_index:08d}"`` (no dots) and one member ``{key}.ids.u16`` (or
``.ids.u32`` when the vocabulary does not fit in 16 bits) holding ``seq_len`` token ids as
raw little-endian bytes.  Tars are byte-deterministic: fixed mtime/uid/gid/mode, members in
sequence order, USTAR headers, so a re-run of a unit reproduces its shards bit for bit.

Readers (``pretrain``) need only :func:`read_manifest`, :func:`shard_urls` and
:func:`decode_sample`::

    m = read_manifest("out/")
    ds = webdataset.WebDataset(shard_urls(m, "train")).map(decode_sample)
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataPipelineError

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
SPLITS = ("train", "validation")
DTYPES = {"uint16": ("u16", np.dtype("<u2")), "uint32": ("u32", np.dtype("<u4"))}
FIELD_TO_DTYPE = {"ids." + ext: dt for ext, dt in DTYPES.values()}
SPECIAL_NAMES = ("pad", "unk", "cls", "sep", "mask")
_BLOCK = tarfile.BLOCKSIZE  # 512
_RECORD = tarfile.RECORDSIZE  # 10240: tar files are padded to a multiple of this
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
    if m.get("format_version") != FORMAT_VERSION:
        return f"format_version is {m.get('format_version')!r}, this reader knows {FORMAT_VERSION}"
    for k, t in (("seq_len", int), ("vocab_size", int), ("dtype", str), ("tokenizer", dict),
                 ("special_ids", dict), ("packing", str), ("splits", dict)):
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


def decode_sample(sample: dict, seq_len: int | None = None) -> np.ndarray:
    """A webdataset sample (dict with ``ids.u16`` or ``ids.u32`` bytes) -> int64 ids.

    With ``seq_len`` the length is checked too.  Raises :class:`DataPipelineError` naming
    the sample's key and shard on a malformed sample.
    """
    key = sample.get("__key__", "?") if isinstance(sample, dict) else "?"
    src = sample.get("__url__", "") if isinstance(sample, dict) else ""
    where_ = f"{src}: sample {key!r}" if src else f"sample {key!r}"
    if not isinstance(sample, dict):
        raise DataPipelineError(f"{where_}: expected a dict, got {type(sample).__name__}")
    fields = [f for f in FIELD_TO_DTYPE if f in sample]
    if len(fields) != 1:
        raise DataPipelineError(
            f"{where_}: expected exactly one of {sorted(FIELD_TO_DTYPE)}, found fields "
            f"{sorted(k for k in sample if not k.startswith('__'))}")
    raw = sample[fields[0]]
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise DataPipelineError(f"{where_}: field {fields[0]} is {type(raw).__name__}, expected raw bytes "
                                "(open the dataset without a decoder)")
    dt = FIELD_TO_DTYPE[fields[0]]
    if len(raw) == 0 or len(raw) % dt.itemsize:
        raise DataPipelineError(f"{where_}: {len(raw)} bytes is not a whole number of {dt.name} ids")
    ids = np.frombuffer(raw, dtype=dt).astype(np.int64)
    if seq_len is not None and ids.shape[0] != seq_len:
        raise DataPipelineError(f"{where_}: {ids.shape[0]} ids, expected seq_len={seq_len}")
    return ids


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


def check_ids(ids: np.ndarray, vocab_size: int, where_: str) -> None:
    """Every id must be < vocab_size: a corrupt id would index past the embedding table."""
    if ids.size and int(ids.max()) >= vocab_size:
        bad = int(np.argmax(ids >= vocab_size))
        raise DataPipelineError(f"{where_}: id {int(ids[bad])} at position {bad} is outside the vocabulary "
                                f"({vocab_size} ids): the shard is corrupt; rebuild or restore it")


def read_shard(path: str | os.PathLike, *, seq_len: int | None = None, vocab_size: int | None = None,
               sha256: str | None = None, stop: int | None = None):
    """Yield the ids (int64) of a shard's first `stop` samples (all without `stop`), in order, checked:
    the length (`seq_len`), every id against the vocabulary (`vocab_size`), and the whole file against
    the manifest's `sha256`, hashed as it is read (after the last wanted sample the rest of the file is
    read too). The last sample is yielded only once the hash matched, so a reader that buffers what it
    reads (pretrain's shuffle chunks) never hands out a sample of a corrupt shard. Errors are one
    DataPipelineError line naming the shard, the member and the sample index."""
    path = str(path)
    if stop is not None and stop <= 0:
        return
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        pending, index = None, 0
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tf:
                for member in tf:
                    if not member.isfile():
                        continue
                    key, _, field = member.name.partition(".")
                    where_ = f"{path}: member {member.name!r} (sample {index})"
                    data = tf.extractfile(member).read()
                    ids = decode_sample({"__key__": key, "__url__": path, field: data}, seq_len)
                    if vocab_size is not None:
                        check_ids(ids, vocab_size, where_)
                    if pending is not None:
                        yield pending
                    pending, index = ids, index + 1
                    if stop is not None and index == stop:
                        break
        except (tarfile.TarError, EOFError, OSError) as e:
            raise DataPipelineError(f"{path}: unreadable tar after sample {index} ({type(e).__name__}: {e}); "
                                    "the shard is corrupt or truncated; rebuild or restore it") from None
        if stop is not None and index < stop:
            raise DataPipelineError(f"{path}: {index} samples, but the manifest says at least {stop}")
        if sha256 is not None:
            digest = reader.drain()
            if digest != sha256:
                raise DataPipelineError(f"{path}: sha256 {digest[:16]}... differs from the manifest's "
                                        f"{sha256[:16]}...: the shard is corrupt; rebuild or restore it")
    if pending is not None:
        yield pending


def iter_shard(path: str | os.PathLike, seq_len: int | None = None):
    """Yield ``(key, ids)`` from one shard with the standard library (no webdataset needed)."""
    with tarfile.open(path, "r:") as tf:
        for member in tf:
            if not member.isfile():
                continue
            key, _, field = member.name.partition(".")
            data = tf.extractfile(member).read()
            yield key, decode_sample({"__key__": key, "__url__": str(path), field: data}, seq_len)


# --------------------------------------------------------------------------- writing


def sha256_file(path: str | os.PathLike, bufsize: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def _tar_header(name: str, size: int) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode = size, _MTIME, 0o444
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti.tobuf(format=tarfile.USTAR_FORMAT)


class ShardWriter:
    """Writes one unit's sequences of one split into size-capped, deterministic tar shards.

    Each shard is written as ``<final>.tmp`` and renamed to its final name only once it is
    complete (flushed and fsynced), so a killed process never leaves a truncated ``.tar``.
    ``close()`` returns the shard records ``{"path", "samples", "tokens", "sha256", "bytes"}``.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str, unit_name: str, dtype: str,
                 seq_len: int, pad_id: int, shard_bytes: int, *, on_shard_done=None):
        check_unit_name(unit_name)
        if dtype not in DTYPES:
            raise DataPipelineError(f"unknown dtype {dtype!r}")
        self.out_dir, self.split, self.unit_name = Path(out_dir), split, unit_name
        self.ext, self.np_dtype = DTYPES[dtype]
        self.seq_len, self.pad_id = seq_len, pad_id
        self.shard_bytes = max(int(shard_bytes), 1)
        self.on_shard_done = on_shard_done  # test/debug hook: called with the record after each rename
        data_size = seq_len * self.np_dtype.itemsize
        self._padding = b"\0" * (-data_size % _BLOCK)
        self._sample_bytes = _BLOCK + data_size + len(self._padding)
        self.records: list[dict] = []
        self.seq_index = 0
        self._k = 0
        self._f = None
        self._tmpl = None
        (self.out_dir / split).mkdir(parents=True, exist_ok=True)

    # -- one shard file
    def _open(self):
        rel = shard_relpath(self.split, self.unit_name, self._k)
        self._rel, self._final = rel, self.out_dir / rel
        self._tmp = self._final.with_name(self._final.name + ".tmp")
        self._f = open(self._tmp, "wb")
        self._hash = hashlib.sha256()
        self._bytes = self._samples = self._tokens = 0

    def _write(self, b: bytes):
        self._f.write(b)
        self._hash.update(b)
        self._bytes += len(b)

    def _finish(self):
        # end of archive: two zero blocks, then pad to a whole record (as GNU tar / tarfile do)
        end = 2 * _BLOCK
        end += -(self._bytes + end) % _RECORD
        self._write(b"\0" * end)
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        os.replace(self._tmp, self._final)
        rec = {"path": self._rel, "samples": self._samples, "tokens": self._tokens,
               "sha256": self._hash.hexdigest(), "bytes": self._bytes}
        self.records.append(rec)
        self._k += 1
        if self.on_shard_done is not None:
            self.on_shard_done(rec)

    def _template(self):
        """The 512-byte header of sample 0 and what varies per sample: the 8 key digits
        in the name, and the checksum (computed as tarfile does: header bytes summed with
        the checksum field as spaces, written as six octal digits, NUL, space)."""
        if getattr(self, "_tmpl", None) is None:
            name = f"{sample_key(self.unit_name, 0)}.ids.{self.ext}"
            hdr = np.frombuffer(_tar_header(name, self.seq_len * self.np_dtype.itemsize), dtype=np.uint8).copy()
            self._digits_at = len(self.unit_name) + 1
            base = hdr.astype(np.int64)
            base[148:156] = 32
            self._chk_base = int(base.sum()) - 8 * ord("0")
            self._tmpl = hdr
        return self._tmpl

    def _records(self, rows: np.ndarray, first_index: int) -> bytes:
        """Tar members (header + data + padding) for consecutive sequences, vectorised."""
        n = rows.shape[0]
        if first_index + n > 10 ** 8:
            raise DataPipelineError(f"unit {self.unit_name}: more than 10**8 sequences; use a smaller unit_mb")
        tmpl = self._template()
        buf = np.zeros((n, self._sample_bytes), dtype=np.uint8)
        buf[:, :_BLOCK] = tmpl
        idx = np.arange(first_index, first_index + n, dtype=np.int64)
        digits = (idx[:, None] // (10 ** np.arange(7, -1, -1, dtype=np.int64))) % 10 + ord("0")
        buf[:, self._digits_at:self._digits_at + 8] = digits
        chk = self._chk_base + digits.sum(axis=1)
        buf[:, 148:154] = (chk[:, None] >> (3 * np.arange(5, -1, -1))) % 8 + ord("0")
        buf[:, 154] = 0
        buf[:, 155] = ord(" ")
        data = rows.view(np.uint8).reshape(n, -1)
        buf[:, _BLOCK:_BLOCK + data.shape[1]] = data
        return buf.tobytes()

    def write(self, seqs: np.ndarray) -> None:
        """Append a ``(n, seq_len)`` array of packed sequences (any integer dtype)."""
        seqs = np.ascontiguousarray(seqs, dtype=self.np_dtype)
        if seqs.ndim != 2 or seqs.shape[1] != self.seq_len:
            raise ValueError(f"expected (n, {self.seq_len}) sequences, got {seqs.shape}")
        nonpad = (seqs != self.pad_id).sum(axis=1)
        i, n = 0, seqs.shape[0]
        while i < n:
            if self._f is None:
                self._open()
            # a sample joins the shard if the shard is empty or it still fits under the target
            fit = (self.shard_bytes - 2 * _BLOCK - self._bytes) // self._sample_bytes
            take = min(n - i, max(fit, 0 if self._samples else 1))
            if take <= 0:
                self._finish()
                continue
            self._write(self._records(seqs[i:i + take], self.seq_index))
            self._samples += take
            self._tokens += int(nonpad[i:i + take].sum())
            self.seq_index += take
            i += take

    def close(self) -> list[dict]:
        if self._f is not None:
            self._finish()
        return self.records

    def abort(self) -> None:
        """Drop the shard being written (its .tmp file); finished shards stay."""
        if self._f is not None:
            self._f.close()
            self._f = None
            self._tmp.unlink(missing_ok=True)
