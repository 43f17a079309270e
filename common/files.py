"""Atomic writes: a temporary name in the same folder, flushed and fsynced, then `os.replace`. A reader
(or a resumed run) sees the old file or the new one, never half of one; a crash leaves at most a
hidden `.NAME.tmp-PID` that no reader looks at."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write `path` through (by any writer: a zip, a figure); renamed over
    `path` when the block ends without error, removed otherwise."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if tmp.is_file():  # fsync what the writer left, so the rename never publishes unwritten blocks
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    return _write(Path(path), lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    return _write(Path(path), lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int | None = 1) -> Path:
    return write_text_atomic(path, json.dumps(value, indent=indent) + "\n")


def _write(path: Path, write: Callable[[BinaryIO], Any]) -> Path:
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (shards, tokenizers, a release's weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
