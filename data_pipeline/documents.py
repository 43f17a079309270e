"""Documents on their way to tokens: normalised, filtered (empty, too short, duplicate) and sent to the
train or validation split by a stable hash. Used by the build (`build.py`) and the global dedup pass
(`dedup.py`), which therefore do not import each other."""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterator

from .config import BuildConfig


class DocFilter:
    """normalise -> filter (empty, too short, duplicate) -> train/validation by stable hash.

    ``drop``: 64-bit hashes (``doc_hash64``) that earlier units already hold (global dedup).
    """

    def __init__(self, cfg: BuildConfig, dedup: bool | None = None, drop: set[int] | None = None):
        self.form = None if cfg.unicode_normalization == "none" else cfg.unicode_normalization
        self.min_chars = cfg.min_chars
        self.dedup = (cfg.dedup != "none") if dedup is None else dedup
        self.drop = drop or None
        self.seen: set[bytes] = set()
        self.key = cfg.split_salt.encode("utf-8")[:64]
        self.val_threshold = round(cfg.validation_fraction * 1_000_000)
        self.dropped = {"empty": 0, "too_short": 0, "duplicate": 0}

    def kept(self, texts: Iterator[str]) -> Iterator[tuple[str, bytes]]:
        """``(normalised text, 16-byte blake2b digest)`` of documents passing the
        empty / too-short filters (no dedup)."""
        form, min_chars, key = self.form, self.min_chars, self.key
        blake2b, is_normalized, normalize = hashlib.blake2b, unicodedata.is_normalized, unicodedata.normalize
        dropped = self.dropped
        for t in texts:
            t = t.strip()
            if form and not t.isascii() and not is_normalized(form, t):
                t = normalize(form, t).strip()
            if not t:
                dropped["empty"] += 1
                continue
            if len(t) < min_chars:
                dropped["too_short"] += 1
                continue
            # surrogatepass: lone surrogates from JSON escapes must not crash the hash
            yield t, blake2b(t.encode("utf-8", "surrogatepass"), digest_size=16, key=key).digest()

    def __call__(self, texts: Iterator[str]) -> Iterator[tuple[str, bool]]:
        """Yield ``(text, is_validation)`` for the documents kept."""
        dedup, seen, drop, thr, dropped = self.dedup, self.seen, self.drop, self.val_threshold, self.dropped
        for t, d in self.kept(texts):
            h = int.from_bytes(d[:8], "little")
            if dedup:
                if d in seen or (drop is not None and h in drop):
                    dropped["duplicate"] += 1
                    continue
                seen.add(d)
            yield t, (h % 1_000_000) < thr
