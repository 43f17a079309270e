"""Cut the demo's movie-review corpus from the unlabelled IMDB reviews (Large Movie Review Dataset,
Maas et al. 2011): `python -m demo.imdb_sample SRC OUT`. The same source always gives the same bytes.

Reviews are ranked by a hash of their id (so the choice does not follow the source's order) and the
first `--reviews` are kept, in that order. The site's `<br />` line breaks become spaces; nothing else
in the text changes. Only the unlabelled reviews are read, so no labelled review can leak into it."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_REVIEWS = 5500


def rank(review_id: str) -> bytes:
    return hashlib.blake2b(review_id.encode("utf-8"), digest_size=8, key=b"demo-imdb").digest()


def cut(src: Path, count: int) -> list[dict[str, str]]:
    with gzip.open(src, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    bad = [i + 1 for i, row in enumerate(rows) if not isinstance(row.get("text"), str) or "id" not in row]
    if bad:
        raise ValueError(f"{src}: line {bad[0]} has no 'id' or no 'text' string")
    if not all(str(row["id"]).startswith("train/unsup/") for row in rows):
        raise ValueError(f"{src}: holds labelled reviews; cut the sample from the unlabelled ones (unsup)")
    rows.sort(key=lambda row: rank(str(row["id"])))
    return [{"id": row["id"], "text": " ".join(row["text"].replace("<br />", " ").split())} for row in rows[:count]]


def write(rows: list[dict[str, str]], out: Path) -> None:
    """gzip with no name and no time in its header: the bytes depend only on the rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.imdb_sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the unlabelled reviews: unsup.jsonl.gz ({'id', 'text'} a line)")
    parser.add_argument("out", type=Path, help="where to write the sample (.jsonl.gz)")
    parser.add_argument("--reviews", type=int, default=DEFAULT_REVIEWS, help=f"how many (default {DEFAULT_REVIEWS})")
    args = parser.parse_args(argv)
    try:
        rows = cut(args.src, args.reviews)
    except (OSError, ValueError) as err:
        print(f"imdb_sample: error: {err}", file=sys.stderr)
        return 2
    write(rows, args.out)
    print(f"{args.out}: {len(rows)} reviews, {args.out.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
