"""Random search: a typed search space (JSON), seeded trials drawn from it, and the trial runner that
records a diverged or crashed trial as failed instead of stopping the sweep.

A space file gives a distribution per hyperparameter; the ones it leaves out keep the sweep's setting:

    {"learning_rate": {"kind": "log_uniform", "low": 1e-5, "high": 1e-4},
     "batch_size": {"kind": "choice", "values": [16, 32]},
     "warmup_ratio": {"kind": "uniform", "low": 0.0, "high": 0.2}}

Trial t of search seed S draws each hyperparameter from its own stream, numpy's
`default_rng([S, t, parameter number])`, and its training seed from `default_rng([S, t])`: the same
command draws the same trials, whatever the mixer, and more trials extend a search without changing
the first ones. The space and the seed are recorded in <sweep-dir>/search.json; planning into a
sweep folder made from another space or seed is refused, naming the difference.
"""

from __future__ import annotations

import json
import math
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import ConfigDict, TypeAdapter, ValidationError

from common.config import Section, build, describe, read_json_object
from common.files import write_json_atomic
from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.sweep import PLAN_FILE, SEARCH_FILE, RunSpec, _models, _record_plan, load_plan
from finetune.tasks import parse_tasks

FAILED_FILE = "failed.json"
SPACES_DIR = Path(__file__).resolve().parent / "spaces"
# The searchable FinetuneConfig fields, in a fixed order: a parameter's number names its random stream.
PARAMETERS = ("learning_rate", "batch_size", "epochs", "warmup_ratio", "weight_decay", "dropout")
INTEGER_PARAMETERS = ("batch_size", "epochs")
SIGNIFICANT_DIGITS = 4  # drawn floats are rounded, so names, tables and plan.json stay readable


class Distribution(Section):
    """One hyperparameter: log-uniform or uniform over [low, high], or a uniform choice among values."""

    kind: Literal["log_uniform", "uniform", "choice"] | None = None  # required: checked in problems()
    low: float | None = None
    high: float | None = None
    values: list[int | float] | None = None


class SearchSpace(Section):
    """The distributions of a random search; a parameter left out keeps the sweep's setting."""

    description: str = ""
    learning_rate: Distribution | None = None
    batch_size: Distribution | None = None
    epochs: Distribution | None = None
    warmup_ratio: Distribution | None = None
    weight_decay: Distribution | None = None
    dropout: Distribution | None = None

    def problems(self) -> list[str]:
        out = []
        for name in PARAMETERS:
            dist = getattr(self, name)
            if dist is not None:
                out += _distribution_problems(name, dist)
        if not self.searched():
            out.append(f"(top level): no hyperparameter to search; give one or more of {', '.join(PARAMETERS)}")
        return out

    def searched(self) -> dict[str, Distribution]:
        return {name: getattr(self, name) for name in PARAMETERS if getattr(self, name) is not None}

    def record(self) -> dict[str, Any]:
        """What defines the draws (the description does not)."""
        return {name: dist.model_dump(exclude_none=True) for name, dist in self.searched().items()}


def _distribution_problems(name: str, dist: Distribution) -> list[str]:
    if dist.kind is None:
        return [f"{name}.kind: required (log_uniform, uniform or choice)"]
    if dist.kind == "choice":
        if dist.low is not None or dist.high is not None:
            return [f"{name}: a choice takes values, not low/high"]
        if not dist.values:
            return [f"{name}.values: a choice needs at least one value"]
        return [p for value in dist.values for p in _value_problems(f"{name}.values", name, value)][:1]
    if name in INTEGER_PARAMETERS:
        return [f"{name}.kind: {name} is an integer; give it as a choice of values, got {dist.kind!r}"]
    if dist.values is not None:
        return [f"{name}: {dist.kind} takes low and high, not values"]
    missing = [end for end in ("low", "high") if getattr(dist, end) is None]
    if missing:
        return [f"{name}.{end}: required for {dist.kind}" for end in missing]
    assert dist.low is not None and dist.high is not None
    out = _value_problems(f"{name}.low", name, dist.low) + _value_problems(f"{name}.high", name, dist.high)
    if not out and dist.low > dist.high:
        out.append(f"{name}: low ({dist.low:g}) is above high ({dist.high:g})")
    if not out and dist.kind == "log_uniform" and dist.low <= 0:
        out.append(f"{name}.low: log_uniform needs low > 0, got {dist.low:g}")
    return out


def _value_problems(key: str, name: str, value: float) -> list[str]:
    """`value` checked against the FinetuneConfig field it will be set to (its type and bounds)."""
    field = FinetuneConfig.model_fields[name]
    kind: Any = Annotated[field.annotation, field]  # the field's type with its bounds (gt, le, ...)
    adapter: TypeAdapter[Any] = TypeAdapter(kind, config=ConfigDict(strict=True))
    try:
        adapter.validate_python(value)
    except ValidationError as err:
        _, message = describe(FinetuneConfig, {**err.errors()[0], "loc": (name,)})
        return [key + message.removeprefix(name)]
    return []


# ---- space files ---------------------------------------------------------------------------------------


def presets() -> list[str]:
    return sorted(path.stem for path in SPACES_DIR.glob("*.json"))


def space_path(name_or_file: str | Path) -> Path:
    """A shipped preset's file (`small`, `base`), or the file given."""
    if str(name_or_file) in presets():
        return SPACES_DIR / f"{name_or_file}.json"
    path = Path(name_or_file)
    if not path.is_file():
        raise FinetuneError(f"search space {name_or_file}: no such file, nor a shipped preset ({', '.join(presets())})")
    return path


def load_space(name_or_file: str | Path) -> SearchSpace:
    """The space in a file or preset; every mistake one line naming the file and the key."""
    path = space_path(name_or_file)
    raw, problem = read_json_object(path)
    if problem:
        raise FinetuneError(problem)
    assert raw is not None
    space, problems = build(SearchSpace, raw)
    if problems or space is None:
        raise FinetuneError("\n".join(f"{path}: {p}" for p in problems))
    return space


# ---- trials --------------------------------------------------------------------------------------------


def draw_trial(space: SearchSpace, search_seed: int, trial: int) -> dict[str, Any]:
    """Trial `trial`'s hyperparameters and training seed: FinetuneConfig fields."""
    drawn: dict[str, Any] = {"seed": int(np.random.default_rng([search_seed, trial]).integers(2**31 - 1))}
    for number, name in enumerate(PARAMETERS):
        dist = getattr(space, name)
        if dist is None:
            continue
        rng = np.random.default_rng([search_seed, trial, number])
        if dist.kind == "choice":
            assert dist.values
            drawn[name] = dist.values[int(rng.integers(len(dist.values)))]
        elif dist.kind == "uniform":
            drawn[name] = _round(rng.uniform(dist.low, dist.high))
        else:
            assert dist.low is not None and dist.high is not None
            drawn[name] = _round(math.exp(rng.uniform(math.log(dist.low), math.log(dist.high))))
    return drawn


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


def plan_random(
    sweep_dir: str | Path,
    releases: list[str] | tuple[str, ...],
    tasks: str | list[str] = "all",
    space: str | Path = "small",
    trials: int = 20,
    search_seed: int = 0,
    init: list[str] | tuple[str, ...] = ("pretrained",),
    **settings: Any,
) -> list[RunSpec]:
    """Plan `trials` random-search trials per model and task into <sweep_dir>/plan.json (runs named
    <model>--<task>--trial<NNN>); every model and task gets the same trials. `settings` are the other
    FinetuneConfig fields, shared by all trials (a field the space searches cannot be one of them)."""
    if trials < 1:
        raise FinetuneError(f"--trials must be at least 1, got {trials}")
    if search_seed < 0:
        raise FinetuneError(f"--search-seed must be >= 0, got {search_seed}")
    sweep_dir = Path(sweep_dir).resolve()
    chosen = load_space(space)
    both = [name for name in (*chosen.searched(), "seed") if name in settings]
    if both:
        raise FinetuneError(
            f"{', '.join(both)}: set by the random search ({space_path(space)}), so not also as a sweep setting"
        )
    # Absolute paths: array tasks may start in another folder than the one that planned.
    for key, value in settings.items():
        if key.endswith(("_dir", "_file", "_dataset")) and isinstance(value, str) and Path(value).exists():
            settings[key] = str(Path(value).resolve())
    models = _models(releases, init)
    draws = [draw_trial(chosen, search_seed, trial) for trial in range(trials)]
    specs = []
    for (label, release, scratch), task in ((m, t) for m in models for t in parse_tasks(tasks)):
        for trial, drawn in enumerate(draws):
            name = f"{label}--{task}--trial{trial:03d}"
            config = FinetuneConfig(
                release=release,
                task=task,
                output_dir=str(sweep_dir / "runs" / name),
                from_scratch=scratch,
                **settings,
                **drawn,
            )
            specs.append(RunSpec(name, label, task, config.to_dict(), trial=trial))
    _record_search(sweep_dir, {"method": "random", "search_seed": search_seed, "space": chosen.record()})
    _record_plan(sweep_dir, specs)
    return specs


def _record_search(sweep_dir: Path, search: dict[str, Any]) -> None:
    path = sweep_dir / SEARCH_FILE
    if path.is_file():
        old = json.loads(path.read_text())
        differ = _differences(old, search)
        if differ:
            raise FinetuneError(
                f"{sweep_dir} was planned from another search ({'; '.join(differ)}); use another sweep folder"
            )
        return
    if (sweep_dir / PLAN_FILE).is_file() and load_plan(sweep_dir):
        raise FinetuneError(f"{sweep_dir} holds a grid sweep; plan the random search into another sweep folder")
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, search)


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: A in the sweep, B now' for each leaf that differs (space keys dotted: learning_rate.high)."""
    out = []
    for key in sorted(set(old) | set(new), key=lambda k: (k not in new, str(k))):
        name = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{name}." if key != "space" else "")
        elif a != b:
            out.append(f"{name}: {_show(a)} in the sweep, {_show(b)} now")
    return out


def _show(value: Any) -> str:
    return "absent" if value is None else json.dumps(value)


def run_trial(spec: RunSpec, progress: bool | None = None) -> dict:
    """Train one trial. A diverged or crashed trial is recorded in <run>/failed.json (reason, kind) and
    returned with score NaN instead of raised: the sweep goes on. On a rerun a diverged trial is
    skipped (it would diverge again); a crashed one is tried again (the cause may be gone)."""
    from finetune.trainer import DivergedError, train

    failed = spec.output_dir / FAILED_FILE
    if failed.is_file():
        record = json.loads(failed.read_text())
        if record["kind"] == "diverged":
            print(f"finetune: {spec.name}: already done (diverged: {record['reason']})", flush=True)
            return _failure(record)
        failed.unlink()
    print(f"finetune: {spec.name}: starting", flush=True)
    try:
        return train(FinetuneConfig.from_dict(spec.config), progress=progress)
    except DivergedError as err:
        record = {"kind": "diverged", "reason": str(err)}
    except Exception as err:  # any crash of one trial: recorded, and the search goes on
        traceback.print_exc(file=sys.stderr)
        record = {"kind": "crashed", "reason": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"}
    spec.output_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(failed, {**record, "config": spec.config})
    print(f"finetune: {spec.name}: failed ({record['kind']}): {record['reason']}", file=sys.stderr, flush=True)
    return _failure(record)


def _failure(record: dict) -> dict:
    return {"score": float("nan"), "dev": {}, "failed": record["reason"], "kind": record["kind"]}


def failure(spec: RunSpec) -> dict | None:
    """The failure record of a finished-but-failed trial, or None."""
    path = spec.output_dir / FAILED_FILE
    return json.loads(path.read_text()) if spec.trial is not None and path.is_file() else None
