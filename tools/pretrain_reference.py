"""The pretraining part of docs/config.md (written by `python -m tools.config_reference`), generated from
the code so that it cannot drift: every field of the pretraining config's typed sections (pretrain/config.py)
and of EncoderConfig (the `model` section), its type, its default, its value in each shipped config
(pretrain/configs/*.json, read by the config's own parser), and the comment next to the field in the
source as its meaning.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import tokenize
import typing
from typing import Any

from pydantic import BaseModel

from common import config as common_config
from hypermixer import PRESETS, EncoderConfig
from hypermixer import config as model_config
from pretrain import config as cfg

DATA_FILLED = ("vocab_size", "max_seq_len", "pad_token_id")  # encoder_config takes them from the data
CHOICES = {
    "precision": cfg.PRECISIONS,
    "optim.decay": cfg.DECAYS,
    "optim.implementation": cfg.OPTIMIZER_IMPLS,
    "logging.wandb.mode": cfg.WANDB_MODES,
    "model.mixer": model_config.MIXERS,
    "model.position_embedding": model_config.EMBEDDING_POSITIONS,
    "model.hypermixer_position": model_config.HYPERMIXER_POSITIONS,
    "model.pooling": model_config.POOLINGS,
}


def field_comments(cls: type) -> dict[str, str]:
    """field name -> its comment: the one on its line, else the comment lines just above it."""
    source = inspect.getsource(cls)
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 1
            while row >= 1 and lines[row - 1].strip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            out[node.target.id] = comments.get(node.lineno) or " ".join(above)
    return out


def cell(text: str) -> str:
    """Text safe in a markdown table cell (pipes split cells, <x> reads as an HTML tag)."""
    return text.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")


def type_text(kind: Any) -> str:
    return common_config.type_text(kind).replace("|", "\\|")


def value_text(value: Any) -> str:
    return f"`{json.dumps(value)}`"


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def shipped() -> dict[str, cfg.PretrainConfig]:
    """The shipped configs as the config's own parser reads them (data.path is unset: not an error here)."""
    out = {}
    order = list(PRESETS)  # tiny, small, base: smallest first
    for name in sorted(cfg.shipped_configs(), key=lambda n: (order.index(n) if n in order else len(order), n)):
        path = cfg.config_path(name)
        config, problems = cfg.from_dict(json.loads(path.read_text()), default_source=str(path))
        problems = [p for p in problems if not p.startswith("data.path:")]
        if problems:
            raise SystemExit(f"tools.pretrain_reference: shipped config {name}: {'; '.join(problems)}")
        out[name] = config
    return out


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _is_section(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, BaseModel)


def section_rows(cls: type[BaseModel], prefix: str, configs: dict[str, cfg.PretrainConfig]) -> list[list[str]]:
    notes = field_comments(cls)
    rows = []
    for name, f in cls.model_fields.items():
        if f.exclude:
            continue  # not a setting (PretrainConfig.source)
        key = f"{prefix}{name}"
        if _is_section(f.annotation) or key in ("model", "deepspeed"):
            continue  # their own tables
        meaning = cell(notes.get(name, ""))
        if key in CHOICES:
            if {part.strip() for part in notes.get(name, "").split("|")} == set(CHOICES[key]):
                meaning = ""  # the comment only lists the choices
            meaning = f"one of {', '.join(f'`{c}`' for c in CHOICES[key])}" + (f"; {meaning}" if meaning else "")
        rows.append(
            [
                f"`{key}`",
                type_text(f.annotation),
                value_text(f.get_default(call_default_factory=True)),
                *[value_text(_get(c, key)) for c in configs.values()],
                meaning,
            ]
        )
    return rows


def model_rows(configs: dict[str, cfg.PretrainConfig]) -> list[list[str]]:
    """`model`: a preset plus EncoderConfig fields; vocab_size, max_seq_len, pad_token_id come from the data."""
    hints, notes = typing.get_type_hints(EncoderConfig), field_comments(EncoderConfig)
    rows = [
        [
            "`model.preset`",
            "str \\| null",
            value_text(cfg.PretrainConfig().model.preset),
            *[value_text(c.model.preset) for c in configs.values()],
            f"one of {', '.join(f'`{p}`' for p in PRESETS)}: the preset's fields, then the keys below on top",
        ]
    ]
    for f in dataclasses.fields(EncoderConfig):
        values = []
        for c in configs.values():
            written = {k: v for k, v in c.model.model_dump().items() if v is not None}
            effective = {**PRESETS.get(c.model.preset or "", {}), **written}
            if f.name in DATA_FILLED and f.name not in written:
                values.append("from the data")
            else:
                values.append(value_text(effective.get(f.name, default_of(f))))
        meaning = cell(notes.get(f.name, ""))
        if f"model.{f.name}" in CHOICES:
            meaning = ", ".join(f"`{c}`" for c in CHOICES[f"model.{f.name}"]) + (f"; {meaning}" if meaning else "")
        if f.name in DATA_FILLED:
            meaning = "unset: the data's (manifest)" + (f"; {meaning}" if meaning else "")
        rows.append([f"`model.{f.name}`", type_text(hints[f.name]), value_text(default_of(f)), *values, meaning])
    return rows


def deepspeed_rows(configs: dict[str, cfg.PretrainConfig]) -> list[list[str]]:
    return [
        [
            "`deepspeed`",
            "object",
            value_text(cfg.PretrainConfig().deepspeed),
            *[value_text(c.deepspeed) for c in configs.values()],
            "passed to DeepSpeed as is (ZeRO stage and options, offload, communication, ...), except the keys below",
        ]
    ]


def table(rows: list[list[str]], names: list[str]) -> str:
    head = ["key", "type", "default", *names, "meaning"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def generate() -> str:
    configs = shipped()
    names = list(configs)
    sections: list[tuple[str, type[BaseModel], str]] = [("top level", cfg.PretrainConfig, "")]
    for name, f in cfg.PretrainConfig.model_fields.items():
        kind = f.annotation
        if _is_section(kind) and name != "model":
            sections.append((f"`{name}`", kind, f"{name}."))
            sections += [
                (f"`{name}.{sub}`", g.annotation, f"{name}.{sub}.")
                for sub, g in kind.model_fields.items()
                if _is_section(g.annotation)
            ]
    parts = [
        "# Pretraining config reference",
        "",
        "<!-- Generated by `python -m tools.config_reference --write docs/config.md` from pretrain/config.py, hypermixer/config.py, "
        "pretrain/configs/*.json and the other stages' typed configs. Do not edit by hand: "
        "tests/test_config_reference.py fails when it is out of date. -->",
        "",
        "Every key of a pretraining config (`deepspeed pretrain/main.py --config NAME_OR_PATH --set key=value`), "
        f"its default, and its value in each shipped config ({', '.join(f'`{n}`' for n in names)}). Values are "
        "JSON. How configs are loaded and checked: [pretrain.md](pretrain.md#config-reference).",
    ]
    for title, cls, prefix in sections:
        parts += ["", f"## {title}", "", table(section_rows(cls, prefix, configs), names)]
    parts += ["", "## `model`", "", table(model_rows(configs), names)]
    parts += [
        "",
        "## `deepspeed`",
        "",
        table(deepspeed_rows(configs), names),
        "",
        "Refused under `deepspeed`, because this config derives them:",
        "",
        "| DeepSpeed key | set instead |",
        "|---|---|",
    ]
    parts += [f"| `{key}` | {instead} |" for key, instead in cfg.DERIVED_DEEPSPEED_KEYS.items()]
    parts += [
        f"| `{key}.enabled` | `precision` (the section's other options pass through) |" for key in cfg.PRECISION_KEYS
    ]
    return "\n".join(parts) + "\n"
