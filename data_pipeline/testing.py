"""Helpers for the data_pipeline tests: synthetic corpora and an independent reference.

The reference (:func:`reference_documents`) re-derives, one document at a time and without
the pipeline's batching, readers or packing code, what each split must contain; the tests
compare it with what decoding the shards gives.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import unicodedata
from pathlib import Path

# The one fault hook in production code: a build process SIGKILLs itself right after renaming its N-th
# shard (counted over all units, so mid-unit) when this variable is N > 0; the crash-resume tests use it.
CRASH_AFTER_SHARDS_ENV = "DATA_PIPELINE_TEST_KILL_AFTER_SHARDS"
_shards_done_in_process = 0


def crash_hook():
    """The shard-written callback that crashes on purpose, or None (the normal case)."""
    n = int(os.environ.get(CRASH_AFTER_SHARDS_ENV, "0") or 0)
    if n <= 0:
        return None

    def hook(_record):
        global _shards_done_in_process
        _shards_done_in_process += 1
        if _shards_done_in_process >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had first one their its new after who they two been have more also time but not "
    "lobster river album season game city war film north church station music team band school "
    "Valkyria Chronicles Homarus gammarus BERT MLP-Mixer HyperMixer tokenizer"
).split()
ODD = [
    "café",
    "naïve",
    "Ångström",
    "東京",
    "Straße",
    "emoji 🙂",
    "[SEP]",
    "[CLS] x",
    "tab\there",
    "ctrl\x07bell",
    "–dash—",
    "ﬁligature",
    "e\u0301",
]


def synthetic_docs(n: int, seed: int = 0, dup_every: int = 23, empty_every: int = 17) -> list[str]:
    """Document texts (no newlines) with duplicates, empty/whitespace docs and odd characters."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        if empty_every and i % empty_every == 5:
            docs.append("   " if i % 2 else "")
            continue
        if dup_every and i % dup_every == dup_every - 1 and docs:
            docs.append(docs[(i * 7919) % len(docs)])
            continue
        k = rng.choice((1, 3, 8, 20, 60, 150, 400))
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
        if rng.random() < 0.3:
            words = [w.capitalize() for w in words]
        docs.append(" ".join(words) + rng.choice((".", "!", "", " ?")))
    return docs


def write_lines(path: Path, docs: list[str], eol: str = "\n") -> Path:
    path.write_bytes(eol.join(docs).encode("utf-8") + eol.encode())
    return path


def reference_documents(
    texts,
    tokenizer_file,
    *,
    validation_fraction: float,
    salt: str = "",
    form: str = "NFC",
    min_chars: int = 0,
    dedup: bool = False,
) -> dict[str, list[list[int]]]:
    """Expected token ids of every kept document per split, in input order."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.encode_special_tokens = True
    thr = round(validation_fraction * 1_000_000)
    out: dict[str, list[list[int]]] = {"train": [], "validation": []}
    seen = set()
    for t in texts:
        t = t.strip()
        if form != "none":
            t = unicodedata.normalize(form, t).strip()
        if not t or len(t) < min_chars:
            continue
        d = hashlib.blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16, key=salt.encode()[:64]).digest()
        if dedup:
            if d in seen:
                continue
            seen.add(d)
        ids = tok.encode(t, add_special_tokens=False).ids
        if not ids:
            continue
        split = "validation" if int.from_bytes(d[:8], "little") % 1_000_000 < thr else "train"
        out[split].append(ids)
    return out


def write_format1_copy(build_dir: str | Path, out_dir: str | Path) -> Path:
    """Copy a finished build as format 1 (one tar member ``{key}.ids.u16`` per sequence, as written
    before issue 17), with its own manifest: for the tests that old shards are still read, and for
    ``bench.data_pipeline``'s before/after bytes per token. Returns the copy's manifest path."""
    import shutil
    import tarfile

    from common.files import write_json_atomic

    from .shards import DTYPES, iter_shard, read_manifest, sha256_file

    m = read_manifest(build_dir)
    src, out = Path(m.pop("_root")), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src / m["tokenizer"]["file"], out / m["tokenizer"]["file"])
    ext, dtype = DTYPES[m["dtype"]]
    for info in m["splits"].values():
        for rec in info["shards"]:
            (out / rec["path"]).parent.mkdir(parents=True, exist_ok=True)
            with tarfile.open(out / rec["path"], "w", format=tarfile.USTAR_FORMAT) as tf:
                for key, ids in iter_shard(src / rec["path"], m["seq_len"]):
                    data = ids.astype(dtype).tobytes()
                    ti = tarfile.TarInfo(f"{key}.ids.{ext}")
                    ti.size, ti.mode = len(data), 0o444
                    tf.addfile(ti, io.BytesIO(data))
            rec["sha256"], rec["bytes"] = sha256_file(out / rec["path"]), (out / rec["path"]).stat().st_size
    m["format_version"] = 1
    m.pop("block_sequences", None)
    write_json_atomic(out / "manifest.json", m)
    return out / "manifest.json"
