"""Synthetic corpora and an independent reference for the data_pipeline tests.

The reference (:func:`reference_documents`) re-derives, one document at a time and without
the pipeline's batching, readers or packing code, what each split must contain; the tests
compare it with what decoding the shards gives.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from pathlib import Path

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
