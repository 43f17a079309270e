"""docs/config.md, generated from the typed configs so that it cannot drift: the pretraining config
(tools/pretrain_reference.py: every key with its value in each shipped config) and the config of every
other stage (data_pipeline build, finetune train, the SLURM cluster options), each key with its type,
default and meaning (the field's description or the comment beside it).

    python -m tools.config_reference                          # print it
    python -m tools.config_reference --write docs/config.md   # regenerate it
    python -m tools.config_reference --check docs/config.md   # exit 1 when it is out of date

A repository tool, not part of any installed package: it may import every stage, and no stage imports it.
"""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.config import type_text
from common.files import write_text_atomic
from data_pipeline.config import BuildConfig
from finetune.config import FinetuneConfig
from slurm.options import ClusterOptions
from tools import pretrain_reference
from tools.pretrain_reference import cell

DOC = Path("docs") / "config.md"  # relative to the repository root
REGENERATE = f"python -m tools.config_reference --write {DOC}"
STAGES: list[tuple[str, str, type[BaseModel]]] = [  # (heading, the command it configures, its model)
    (
        "Data pipeline build",
        "`python -m data_pipeline build|plan` (flags: `--seq-len` for `seq_len`, ...; stored in `<out>/config.json`)",
        BuildConfig,
    ),
    (
        "Fine-tuning run",
        "`python -m finetune train|sweep` (flags: `--lr` for `learning_rate`, `--predict` for "
        "`predict_test`, the others `--name-with-dashes`)",
        FinetuneConfig,
    ),
    (
        "SLURM cluster options",
        "`python -m slurm STAGE` (flags `--name-with-dashes`, or a JSON file via `--config`)",
        ClusterOptions,
    ),
]


def literal_choices(annotation: Any) -> tuple[Any, ...] | None:
    """The values of a Literal field, also of an optional one (Literal[...] | None)."""
    for kind in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(kind) is typing.Literal:
            return typing.get_args(kind)
    return None


def fields_table(cls: type[BaseModel]) -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():
        default = "required" if field.is_required() else f"`{json.dumps(field.get_default(call_default_factory=True))}`"
        kind = cell(type_text(field.annotation))
        choices = literal_choices(field.annotation)
        meaning = cell(field.description or "")
        if choices:
            meaning = f"one of {', '.join(f'`{c}`' for c in choices)}" + (f"; {meaning}" if meaning else "")
        lines.append(f"| `{name}` | {kind} | {default} | {meaning} |")
    return "\n".join(lines)


def generate() -> str:
    parts = [pretrain_reference.generate().rstrip()]
    for title, command, model in STAGES:
        parts += ["", f"# {title}", "", f"Configures {command}.", "", fields_table(model)]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.config_reference", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", type=Path, metavar="FILE", help=f"write it to FILE (the repository's: {DOC})")
    mode.add_argument("--check", type=Path, metavar="FILE", help="exit 1 when FILE differs from it")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        write_text_atomic(args.write, text)
        print(f"wrote {args.write}")
    elif args.check:
        if not args.check.is_file() or args.check.read_text() != text:
            print(f"{args.check} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{args.check} is up to date")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
