"""The typed-config machinery every stage uses: pydantic v2 models, read from JSON and `--set a.b=value`
overrides (or CLI flags), checked completely, every mistake one line naming the key, where it was set
(file or flag), the value and what was expected, with a did-you-mean for a misspelt key.

    class Optim(Section):
        lr: float = Field(5e-4, gt=0)  # peak learning rate

    config, problems = build(Top, raw, sources)   # problems: list of one-line strings

Checks that involve several fields are plain `problems()` methods on the models (see `Section`); they
run on a model whose mistaken keys were put back to their defaults, so one mistake does not hide another.
"""

from __future__ import annotations

import contextvars
import copy
import difflib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from typing_extensions import Self


class Section(BaseModel):
    """A config section: unknown keys refused, types strict (no "2" for 2, no 1.5 for an int, no "yes"
    for true), and a `problems()` hook for checks across fields."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=False)

    def problems(self) -> list[str]:
        """Cross-field checks, one message per mistake ("key: what is wrong"); sections recurse."""
        out: list[str] = []
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, Section):
                out += value.problems()
        return out


# ---------------------------------------------------------------------------------------- sources


def read_json_object(path: str | os.PathLike) -> tuple[dict[str, Any] | None, str | None]:
    """(the object, None) or (None, a one-line problem naming the file)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as err:
        return None, f"{path}: cannot read ({err.strerror or err})"
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return None, f"{path}: not valid JSON ({err})"
    if not isinstance(raw, dict):
        return None, f"{path}: the top level must be a JSON object"
    return raw, None


def parse_value(text: str) -> Any:
    """`--set` values are JSON where they parse as JSON (numbers, true, null, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> tuple[str | None, str | None]:
    """Apply one `a.b.c=value` to a raw config dict: (the dotted key, None) or (None, a problem)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        return None, f"--set {item!r}: expected section.key=value"
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return None, f"--set {item!r}: {'.'.join(parts[: depth + 1])} is not a section"
        node = child
    node[parts[-1]] = parse_value(value)
    return ".".join(parts), None


# ---------------------------------------------------------------------------------------- building

M = typing.TypeVar("M", bound=BaseModel)


def build(
    cls: type[M], raw: dict[str, Any], sources: dict[str, str] | None = None, default_source: str = ""
) -> tuple[M | None, list[str]]:
    """Validate `raw` as `cls`. Returns the model (mistaken keys back at their defaults; None when a
    required key is missing or mistaken) and every
    problem, one line each: field mistakes first, then the models' cross-field `problems()` for keys
    that had no field mistake. `sources` maps dotted keys to where they were set ("--set x=1",
    "--lr"); the rest were set in `default_source` (a file name; "" names none)."""
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    flagged: list[str] = []
    model: M | None = None
    while model is None:
        try:
            model = cls.model_validate(raw)
        except ValidationError as err:
            before = json.dumps(raw, sort_keys=True, default=str)
            for error in err.errors():
                key, message = describe(cls, error)
                if key not in flagged:
                    problems.append(message + where(key, sources or {}, default_source))
                    flagged.append(key)
                _remove(raw, _field_path(error["loc"]))
            if json.dumps(raw, sort_keys=True, default=str) == before:  # only required keys are missing
                return None, problems
    cross = model.problems() if isinstance(model, Section) else []
    problems += [p for p in cross if not any(_covers(key, p.split(":")[0]) for key in flagged)]
    return model, problems


def _covers(flagged: str, key: str) -> bool:
    """A field mistake at `flagged` already explains a cross-field message about `key` (or its child)."""
    return key == flagged or key.startswith(flagged + ".")


def where(key: str, sources: dict[str, str], default_source: str) -> str:
    parts = key.split(".")
    for depth in range(len(parts), 0, -1):
        source = sources.get(".".join(parts[:depth]))
        if source:
            return f" ({source})"
    return f" (in {default_source})" if default_source else ""


def _field_path(loc: tuple[Any, ...]) -> tuple[str, ...]:
    """The dotted field a pydantic error location points at (list indices dropped)."""
    path = []
    for part in loc:
        if isinstance(part, int):
            break
        path.append(str(part))
    return tuple(path)


def _remove(raw: dict[str, Any], path: tuple[str, ...]) -> None:
    node: Any = raw
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and path:
        node.pop(path[-1], None)


def describe(cls: type[BaseModel], error: Any) -> tuple[str, str]:
    """(dotted key, "key: what is wrong, got VALUE") for one pydantic error."""
    path = _field_path(error["loc"])
    key = ".".join(path)
    kind, ctx = error["type"], error.get("ctx") or {}
    got = f", got {_json(error['input'])}"
    if kind == "extra_forbidden":
        owner = _model_at(cls, path[:-1])
        known = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(path[-1], known, n=1)
        hint = f"; did you mean {'.'.join((*path[:-1], close[0]))!r}?" if close else ""
        return key, f"{key}: unknown key{hint} (known: {', '.join(known)})"
    if kind == "missing":
        return key, f"{key}: required"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()))
        return key, f"{key}: must be {bounds[kind]} {limit:g}{got}"
    if kind in ("too_short", "too_long"):
        limit = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        return key, f"{key}: must have {'at least' if kind == 'too_short' else 'at most'} {limit} item(s){got}"
    if kind == "literal_error":
        return key, f"{key}: must be one of {ctx['expected'].replace(chr(39), '')}{got}"
    annotation = _annotation_at(cls, path)
    if annotation is not None and kind.endswith(("_type", "_parsing", "_from_float")):
        return key, f"{key}: expected {type_name(annotation)}{got}"
    if kind == "model_type":
        return key, f"{key}: expected an object{got}"
    message = str(error.get("msg", kind))
    message = message.removeprefix("Value error, ")
    return key, f"{key}: {message[:1].lower()}{message[1:]}{got}"


def _json(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _model_at(cls: type[BaseModel], path: tuple[str, ...]) -> type[BaseModel] | None:
    current: Any = cls
    for part in path:
        field = current.model_fields.get(part) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None
        current = _model_of(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _annotation_at(cls: type[BaseModel], path: tuple[str, ...]) -> Any:
    owner = _model_at(cls, path[:-1])
    if owner is None or not path or path[-1] not in owner.model_fields:
        return None
    return owner.model_fields[path[-1]].annotation


def _model_of(annotation: Any) -> Any:
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def type_name(kind: Any) -> str:
    """The expected type in words: "an integer or null", "a list of number", "true/false"."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if kind is type(None):
        return "null"
    if origin is list:
        return f"a list of {type_name(args[0]).removeprefix('a ').removeprefix('an ')}"
    if origin is dict or kind is dict:
        return "an object"
    if isinstance(kind, type) and issubclass(kind, BaseModel):
        return "an object"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(kind, str(kind))


def type_text(kind: Any) -> str:
    """The type as the config reference prints it: int | null, list[float], object."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in args)
    if origin is typing.Literal:
        return "str"
    if kind is type(None):
        return "null"
    if origin is list:
        return f"list[{type_text(args[0])}]"
    if origin is dict or kind is dict:
        return "object"
    return getattr(kind, "__name__", str(kind))


# ---------------------------------------------------------------------------------------- checked models


_BUILDING: contextvars.ContextVar[bool] = contextvars.ContextVar("building", default=False)
_SOURCES: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("sources", default=None)


class Checked(Section):
    """A section built directly by code or a CLI (`BuildConfig(inputs=..., out_dir=...)`): construction
    runs `build`, and any mistake raises the stage's own error class (`error`, a one-line message per
    mistake, joined by "; ")."""

    error: typing.ClassVar[type[Exception]] = ValueError
    label: typing.ClassVar[str] = "invalid config"

    def __init__(self, /, **values: Any) -> None:
        if _BUILDING.get():  # called by pydantic's own validation inside `build`: plain construction
            super().__init__(**values)
            return
        sources = _SOURCES.get()
        token = _BUILDING.set(True)
        try:
            _, problems = build(type(self), values, sources)
            if not problems:
                super().__init__(**values)  # valid: construct (pydantic validates once more; cheap)
        finally:
            _BUILDING.reset(token)
        if problems:
            raise self.error(f"{self.label}: " + "; ".join(problems))

    @classmethod
    def with_sources(cls, values: dict[str, Any], sources: dict[str, str] | None) -> Self:
        """`cls(**values)`, a mistake naming where its key was set (`sources`: key -> "--lr 3", "in x.json")."""
        token = _SOURCES.set(sources)
        try:
            return cls(**values)
        finally:
            _SOURCES.reset(token)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "") -> Self:
        """From a stored dict (e.g. a config.json); mistakes name `source`."""
        return cls.with_sources(values, {key: f"in {source}" for key in values} if source else None)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> Self:
        return type(self)(**{**self.model_dump(), **changes})


# ---------------------------------------------------------------------------------------- CLI flags


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(
    parser: Any, cls: type[BaseModel], names: typing.Iterable[str], rename: dict[str, str] | None = None
) -> None:
    """One flag per field of `cls`: its type, choices (a Literal), true/false (`--x/--no-x`) and help (the
    field's description and default) come from the model, so the CLI cannot drift from the config.
    Flags not given are absent from the namespace (`config_values` then leaves the model's default)."""
    import argparse

    for name in names:
        field = cls.model_fields[name]
        kind = field.annotation
        args = typing.get_args(kind)
        if type(None) in args:
            kind = next(a for a in args if a is not type(None))
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        text = (field.description or "") + (f" (default: {default})" if default not in (None, "", [], {}) else "")
        options: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": text.strip() or None}
        if field.is_required():
            options["required"] = True
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is typing.Literal:
            options["choices"] = typing.get_args(kind)
        elif typing.get_origin(kind) is list:
            options.update(nargs="+", type=typing.get_args(kind)[0])
        elif kind in (int, float, str):
            options["type"] = kind
        else:
            raise TypeError(f"{cls.__name__}.{name}: no flag for type {kind}")
        parser.add_argument((rename or {}).get(name, flag_name(name)), **options)


def config_values(
    namespace: Any, cls: type[BaseModel], rename: dict[str, str] | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """The fields of `cls` given as flags: (values, sources), the sources naming each flag as typed."""
    values, sources = {}, {}
    for name in cls.model_fields:
        if hasattr(namespace, name):
            value = getattr(namespace, name)
            values[name] = value
            flag = (rename or {}).get(name, flag_name(name))
            sources[name] = f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}"
    return values, sources
