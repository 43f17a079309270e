"""docs/config.md, generated from the typed configs so that it cannot drift: the pretraining config
(pretrain/reference.py: every key with its value in each shipped config) and the config of every other
stage (data_pipeline build, finetune train, the SLURM cluster options), each key with its type, default
and meaning (the field's description or the comment beside it).

    python -m common.reference            # print it
    python -m common.reference --write    # regenerate docs/config.md
    python -m common.reference --check    # exit 1 when docs/config.md is out of date

A documentation tool: it reads each stage's config module by name (importlib) and no stage imports it,
so the layering (common below every stage) holds for the code that runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.config import type_text
from common.files import write_text_atomic

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"
REGENERATE = "python -m common.reference --write"
STAGES = [  # (heading, the command it configures, "module:Model")
    (
        "Data pipeline build",
        "`python -m data_pipeline build|plan` (flags: `--seq-len` for `seq_len`, ...; stored in `<out>/config.json`)",
        "data_pipeline.config:BuildConfig",
    ),
    (
        "Fine-tuning run",
        "`python -m finetune train|sweep` (flags: `--lr` for `learning_rate`, `--predict` for "
        "`predict_test`, the others `--name-with-dashes`)",
        "finetune.config:FinetuneConfig",
    ),
    (
        "SLURM cluster options",
        "`python -m slurm STAGE` (flags `--name-with-dashes`, or a JSON file via `--config`)",
        "slurm.options:ClusterOptions",
    ),
]


def cell(text: str) -> str:
    """Text safe in a markdown table cell (pipes split cells, <x> reads as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def _load(target: str) -> type[BaseModel]:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


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
    pretrain_reference: Any = importlib.import_module("pretrain.reference")
    parts = [pretrain_reference.generate().rstrip()]
    for title, command, target in STAGES:
        parts += ["", f"# {title}", "", f"Configures {command}.", "", fields_table(_load(target))]
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.reference", description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help=f"regenerate {DOC}")
    mode.add_argument("--check", action="store_true", help=f"exit 1 when {DOC} is out of date")
    args = parser.parse_args(argv)
    text = generate()
    if args.write:
        write_text_atomic(DOC, text)
        print(f"wrote {DOC}")
    elif args.check:
        if not DOC.is_file() or DOC.read_text() != text:
            print(f"{DOC} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        print(f"{DOC} is up to date")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
