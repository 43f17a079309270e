"""Sweeps: a grid over model x task x learning rate x batch size x seed, run one after another
or as a SLURM array, then aggregated into results.json, results.md and results.png.

The API a launcher needs (stable; see docs/finetune.md):
    specs = plan_sweep(sweep_dir, releases, tasks, learning_rates, seeds, ...)  # writes plan.json
    run_one(spec)        # trains one run into <sweep_dir>/runs/<name>/; skips a run already done
    aggregate(sweep_dir) # -> dict, and writes results.{json,md,png}
A RunSpec is JSON (`to_dict`/`from_dict`), and `load_plan(sweep_dir)[i]` is array task i's run.
"""

from __future__ import annotations

import itertools
import json
import statistics
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from finetune import metrics
from finetune.config import FinetuneConfig
from finetune.errors import FinetuneError
from finetune.files import default_task_name
from finetune.model import release_digest
from finetune.tasks import GLUE_TASKS, parse_tasks
from finetune.trainer import RESULT_FILE, train

PLAN_FILE = "plan.json"
PLAN_FORMAT = 1
SEARCH_FILE = "search.json"  # a random search's space and seed (finetune/search.py)
INITS = ("pretrained", "scratch")


@dataclass(frozen=True)
class RunSpec:
    name: str  # <model>--<task>--lr<lr>--bs<bs>--seed<seed>; also the run's folder under runs/
    model: str  # the release's label, "-scratch" appended for random init
    task: str
    config: dict[str, Any]  # a FinetuneConfig as a dict
    trial: int | None = None  # a random-search trial's number (finetune/search.py); None in a grid

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunSpec:
        return cls(**values)

    @property
    def output_dir(self) -> Path:
        return Path(self.config["output_dir"])


def plan_sweep(
    sweep_dir: str | Path,
    releases: Iterable[str],
    tasks: str | Iterable[str] = "all",
    learning_rates: Iterable[float] = (2e-5, 3e-5, 5e-5),
    seeds: Iterable[int] = (0, 1, 2),
    batch_sizes: Iterable[int] = (32,),
    init: Iterable[str] = ("pretrained",),
    **settings: Any,
) -> list[RunSpec]:
    """Expand the grid into run specs (deterministic names and order) and record them in
    <sweep_dir>/plan.json. A release is a folder, or `label=folder` to name it in tables.
    `settings` are other FinetuneConfig fields (glue_dir or hf_dataset, epochs, ...).
    Planning again into the same folder adds new runs; a known run with other settings is refused."""
    sweep_dir = Path(sweep_dir).resolve()
    # Absolute paths: array tasks may start in another folder than the one that planned.
    for key in ("glue_dir", "hf_dataset", "train_file", "dev_file", "test_file"):
        if settings.get(key) and Path(settings[key]).exists():
            settings[key] = str(Path(settings[key]).resolve())
    if "release" in settings or "task" in settings or "output_dir" in settings:
        raise FinetuneError("plan_sweep: give releases and tasks as their own arguments, not in settings")
    if (sweep_dir / SEARCH_FILE).is_file():
        raise FinetuneError(f"{sweep_dir} holds a random search; plan the grid into another sweep folder")
    models = _models(releases, init)
    specs = []
    for (label, release, scratch), task, lr, bs, seed in itertools.product(
        models, _task_names(tasks, settings), _unique(learning_rates), _unique(batch_sizes), _unique(seeds)
    ):
        name = f"{label}--{task}--lr{lr:g}--bs{bs}--seed{seed}"
        config = FinetuneConfig(
            release=release,
            task=task,
            output_dir=str(sweep_dir / "runs" / name),
            from_scratch=scratch,
            learning_rate=lr,
            batch_size=bs,
            seed=seed,
            **settings,
        )
        specs.append(RunSpec(name, label, task, config.to_dict()))
    _record_plan(sweep_dir, specs)
    return specs


def _task_names(tasks: str | Iterable[str], settings: dict[str, Any]) -> list[str]:
    """GLUE tasks by name, or, with a train_file, the one task it makes: named by `tasks` unless that
    is 'all' (then by the file, as `train --train-file` names it)."""
    if not settings.get("train_file"):
        return parse_tasks(tasks)
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    if len(names) > 1:
        raise FinetuneError(f"--train-file makes one task; --tasks gives {len(names)} names ({', '.join(names)})")
    return [default_task_name(settings["train_file"]) if names in ([], ["all"]) else names[0]]


def load_plan(sweep_dir: str | Path) -> list[RunSpec]:
    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise FinetuneError(f"{path}: no such file (plan the sweep first: python -m finetune sweep --plan-only ...)")
    plan = json.loads(path.read_text())
    if plan.get("format") != PLAN_FORMAT:
        raise FinetuneError(f"{path}: plan format {plan.get('format')!r} is not {PLAN_FORMAT}")
    return [RunSpec.from_dict(run) for run in plan["runs"]]


def run_one(spec: RunSpec | dict[str, Any], progress: bool | None = None) -> dict:
    """Train one planned run, or return its result if <run>/result.json already exists."""
    spec = spec if isinstance(spec, RunSpec) else RunSpec.from_dict(spec)
    done = spec.output_dir / RESULT_FILE
    if done.is_file():
        result = json.loads(done.read_text())
        recorded = result.get("release_sha256")  # absent from runs made before it was recorded
        now = release_digest(spec.config["release"], spec.config["from_scratch"])
        if recorded is not None and now is not None and recorded != now:
            raise FinetuneError(
                f"{spec.name}: finished from other weights than {spec.config['release']} holds now "
                f"(model.safetensors sha256 {recorded[:12]}..., now {now[:12]}...): remove {spec.output_dir} "
                "to train it from these, or plan the sweep into another folder"
            )
        print(f"finetune: {spec.name}: already done ({done})", flush=True)
        return result
    if spec.trial is not None:  # a random-search trial: a failure is recorded, not raised
        from finetune.search import run_trial

        return run_trial(spec, progress=progress)
    print(f"finetune: {spec.name}: starting", flush=True)
    return train(FinetuneConfig.from_dict(spec.config), progress=progress)


def run_sweep(sweep_dir: str | Path, progress: bool | None = None) -> dict:
    """Every planned run, one after another (done ones are skipped), then the aggregation."""
    specs = load_plan(sweep_dir)
    for number, spec in enumerate(specs, start=1):
        print(f"finetune: run {number}/{len(specs)}", flush=True)
        run_one(spec, progress=progress)
    return aggregate(sweep_dir)


# ---- aggregation -----------------------------------------------------------------------------------


def aggregate(sweep_dir: str | Path) -> dict:
    """Per model and task: for each (learning rate, batch size), the median over seeds; the setting
    with the best median; and the best single run. Plus the GLUE score of both where all nine tasks
    are there. Writes results.json, results.md, results.png into the sweep folder."""
    from finetune.search import failure

    sweep_dir = Path(sweep_dir)
    specs = load_plan(sweep_dir)
    results, missing, failed = {}, [], {}
    for spec in specs:
        path = spec.output_dir / RESULT_FILE
        if path.is_file():
            results[spec.name] = json.loads(path.read_text())
        elif failure(spec) is not None:
            failed[spec.name] = failure(spec)
        else:
            missing.append(spec.name)
    if not results and not failed:
        raise FinetuneError(f"{sweep_dir}: none of the {len(specs)} planned runs has finished yet")
    models: dict[str, dict] = {}
    for spec in specs:
        entry = models.setdefault(
            spec.model, {"release": spec.config["release"], "from_scratch": spec.config["from_scratch"], "tasks": {}}
        )
        if spec.name in results:
            entry["tasks"].setdefault(spec.task, []).append((spec, results[spec.name]))
    for entry in models.values():
        entry["tasks"] = {task: _summarise_task(task, runs) for task, runs in entry["tasks"].items()}
        entry["glue_score"] = {
            kind: metrics.glue_score(
                {task: summary[kind]["score"] for task, summary in entry["tasks"].items() if task in GLUE_TASKS}
            )
            for kind in ("median", "best")
        }
    summary = {
        "sweep_dir": str(sweep_dir.resolve()),
        "runs_planned": len(specs),
        "runs_done": len(results),
        "missing_runs": missing,
        "failed_runs": {name: f"{record['kind']}: {record['reason']}" for name, record in failed.items()},
        "glue_score_convention": "mean of the nine task scores; a task's score is the mean of its metrics; "
        "MNLI's is the mean of matched and mismatched accuracy; AX not included",
        "models": models,
    }
    if any(spec.trial is not None for spec in specs):  # a random search: expected validation performance
        from finetune import evp

        summary["evp"] = evp.summarise(summary, specs, results, failed)
    write_json_atomic(sweep_dir / "results.json", summary)
    (sweep_dir / "results.md").write_text(markdown_table(summary) + (evp.markdown(summary) if "evp" in summary else ""))
    plot(summary, sweep_dir / "results.png")
    if "evp" in summary:
        evp.plot_tasks(summary, sweep_dir)
    return summary


def _summarise_task(task: str, runs: list[tuple[RunSpec, dict]]) -> dict:
    by_setting: dict[tuple[float, int], list[tuple[RunSpec, dict]]] = {}
    for spec, result in runs:
        by_setting.setdefault((spec.config["learning_rate"], spec.config["batch_size"]), []).append((spec, result))
    settings = []
    for (lr, bs), group in by_setting.items():
        settings.append(
            {
                "learning_rate": lr,
                "batch_size": bs,
                "seeds": [spec.config["seed"] for spec, _ in group],
                "scores": [result["score"] for _, result in group],
                "score": statistics.median(result["score"] for _, result in group),
                # Each metric's own median over seeds, as papers report "median of N runs" per metric.
                "dev": {
                    ev: {m: statistics.median(r["dev"][ev][m] for _, r in group) for m in values}
                    for ev, values in group[0][1]["dev"].items()
                },
            }
        )
    chosen = max(settings, key=lambda s: s["score"])  # first of equals: plan order
    best_spec, best_result = max(runs, key=lambda run: run[1]["score"])
    return {
        "metrics": list(runs[0][1]["metrics"]),
        "runs": len(runs),
        "median": chosen,
        "best": {
            "score": best_result["score"],
            "dev": best_result["dev"],
            "run": best_spec.name,
            "learning_rate": best_spec.config["learning_rate"],
            "batch_size": best_spec.config["batch_size"],
            "seed": best_spec.config["seed"],
        },
        "settings": settings,
    }


def markdown_table(summary: dict) -> str:
    """A summary table (models x tasks, median over seeds) and one detail table per model."""
    tasks = _tasks_in(summary)
    heads = [_task_head(t) for t in tasks]
    lines = [
        "# GLUE dev results",
        "",
        f"{summary['runs_done']} of {summary['runs_planned']} planned runs done. Values x100. Per task: the median over "
        "seeds of the (learning rate, batch size) with the best median; metrics as GLUE reports them "
        "(MRPC, QQP: F1/accuracy; STS-B: Pearson/Spearman; MNLI: matched/mismatched accuracy; CoLA: Matthews corr.). "
        "GLUE = mean of the nine task scores (a task's score is the mean of its metrics), shown only when all nine are there.",
        "",
        "| Model | " + " | ".join(heads) + " | GLUE |",
        "|---" * (len(tasks) + 2) + "|",
    ]
    for label, model in summary["models"].items():
        cells = [_cell(model["tasks"][t]["median"]["dev"]) if t in model["tasks"] else "-" for t in tasks]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(model['glue_score']['median'])} |")
    for label, model in summary["models"].items():
        kind = "random init" if model["from_scratch"] else "pretrained"
        lines += [
            "",
            f"## {label} ({kind}, `{model['release']}`)",
            "",
            "| Task | Metrics | Median over seeds | Best run | lr | batch | seeds |",
            "|---|---|---|---|---|---|---|",
        ]
        for task in tasks:
            if task not in model["tasks"]:
                continue
            s = model["tasks"][task]
            names = "/".join(metrics.DISPLAY[m] for m in s["metrics"])
            lines.append(
                f"| {_task_head(task)} | {names} | {_cell(s['median']['dev'])} | {_cell(s['best']['dev'])} | "
                f"{s['median']['learning_rate']:g} | {s['median']['batch_size']} | {len(s['median']['seeds'])} |"
            )
        lines.append(f"| GLUE | | {_pct(model['glue_score']['median'])} | {_pct(model['glue_score']['best'])} | | | |")
    if summary["missing_runs"]:
        lines += ["", f"Not finished: {len(summary['missing_runs'])} runs, e.g. `{summary['missing_runs'][0]}`."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    """Grouped bars: per task (and GLUE), each model's median task score; a dot marks the best run."""
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in batch jobs

    tasks = _tasks_in(summary)
    with_glue = any(m["glue_score"]["median"] is not None for m in summary["models"].values())
    groups = tasks + (["GLUE"] if with_glue else [])
    models = list(summary["models"].items())
    width = 0.8 / len(models)
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(models)) ** 0.5 + 2), 4.0), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    for number, (label, model) in enumerate(models):
        medians, bests = [], []
        for group in groups:
            if group == "GLUE":
                medians.append(model["glue_score"]["median"])
                bests.append(model["glue_score"]["best"])
            elif group in model["tasks"]:
                medians.append(model["tasks"][group]["median"]["score"])
                bests.append(model["tasks"][group]["best"]["score"])
            else:
                medians.append(None)
                bests.append(None)
        offset = x - 0.4 + width * (number + 0.5)
        ax.bar(offset, [100 * v if v is not None else np.nan for v in medians], width, label=label)
        ax.plot(offset, [100 * v if v is not None else np.nan for v in bests], "k.", markersize=4)
    ax.set_xticks(x, [_task_head(g) if g != "GLUE" else g for g in groups], rotation=30, ha="right")
    ax.set_ylabel("dev score (x100): median over seeds; dot = best run")
    ax.axhline(0, color="gray", linewidth=0.5)
    ax.legend(fontsize="small")
    ax.set_title("GLUE dev")
    fig.savefig(path, dpi=120)


def _models(releases: Iterable[str], init: Iterable[str]) -> list[tuple[str, str, bool]]:
    inits = _unique(init)
    for kind in inits:
        if kind not in INITS:
            raise FinetuneError(f"init must be pretrained or scratch, got {kind!r}")
    models, seen = [], {}
    for item in _unique(releases):
        label, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        folder = str(Path(folder).resolve())
        label = label or Path(folder).name
        if label in seen and seen[label] != folder:
            raise FinetuneError(
                f"two releases are both called {label!r} ({seen[label]}, {folder}); name them with label=folder"
            )
        seen[label] = folder
        for kind in inits:
            models.append((label + ("-scratch" if kind == "scratch" else ""), folder, kind == "scratch"))
    if not models:
        raise FinetuneError("no release given")
    return models


def _record_plan(sweep_dir: Path, specs: list[RunSpec]) -> None:
    path = sweep_dir / PLAN_FILE
    known = {spec.name: spec for spec in load_plan(sweep_dir)} if path.is_file() else {}
    for spec in specs:
        old = known.get(spec.name)
        if old is not None and old != spec:
            differ = sorted(k for k in spec.config if spec.config[k] != old.config.get(k))
            raise FinetuneError(
                f"{path}: run {spec.name} is already planned with other settings "
                f"({', '.join(differ)}); use another sweep folder"
            )
        known[spec.name] = spec
    sweep_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"format": PLAN_FORMAT, "runs": [spec.to_dict() for spec in known.values()]})


def _tasks_in(summary: dict) -> list[str]:
    """The summary's tasks: GLUE's in GLUE order, then tasks from the user's files by name."""
    present = {t for m in summary["models"].values() for t in m["tasks"]}
    return [t for t in GLUE_TASKS if t in present] + sorted(present - set(GLUE_TASKS))


def _unique(values: Iterable) -> list:
    values = [values] if isinstance(values, (str, int, float)) else list(values)
    return list(dict.fromkeys(values))


def _task_head(task: str) -> str:
    return "MNLI-m/mm" if task == "MNLI" else task


def _cell(dev: dict[str, dict[str, float]]) -> str:
    return "/".join(f"{100 * v:.1f}" for values in dev.values() for v in values.values())


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"
