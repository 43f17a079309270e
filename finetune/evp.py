"""Expected validation performance (Dodge et al. 2019, "Show Your Work"): from N random-search trial
scores, the expected best dev score after k trials, k = 1..N, with its standard deviation.

Exact, from order statistics (no resampling): with the scores sorted ascending v_(1) <= ... <= v_(N)
and k trials drawn uniformly with replacement, P(max = v_(i)) = (i/N)^k - ((i-1)/N)^k, so
E[max] = sum_i v_(i) P_i and Var[max] = sum_i v_(i)^2 P_i - E[max]^2. Tied scores need no care: their
probabilities add up to the tie's.

A failed trial (diverged or crashed) counts as the worst score of its model and task, as Dodge et al.
count it: it never helps, and it takes the place of a trial that could have.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.files import atomic_path

TABLE_KS = (1, 5)  # and N: the columns of the table
FAILED_CONVENTION = (
    "a failed trial (diverged or crashed) counts as the worst score among its model's and task's trials "
    "(Dodge et al. 2019)"
)


def expected_max(scores: Sequence[float], k: int) -> tuple[float, float]:
    """(mean, standard deviation) of the best of k scores drawn with replacement from `scores`."""
    if not scores:
        raise ValueError("expected_max: no scores")
    if k < 1:
        raise ValueError(f"expected_max: k must be >= 1, got {k}")
    values = np.sort(np.asarray(scores, dtype=np.float64))
    n = len(values)
    ranks = np.arange(1, n + 1)
    prob = (ranks / n) ** k - ((ranks - 1) / n) ** k
    mean = float(prob @ values)
    variance = float(prob @ values**2) - mean**2
    return mean, math.sqrt(max(variance, 0.0))  # rounding can leave a tiny negative variance


def curve(scores: Sequence[float]) -> list[dict[str, float]]:
    """The expected best score at k = 1..N (N = len(scores)), with the band (± one std)."""
    out = []
    for k in range(1, len(scores) + 1):
        mean, std = expected_max(scores, k)
        out.append({"k": k, "mean": mean, "std": std})
    return out


def with_failures(scores: Sequence[float | None]) -> list[float]:
    """Trial scores with each failed trial (None) replaced by the worst finished one; [] if all failed."""
    finished = [s for s in scores if s is not None]
    if not finished:
        return []
    worst = min(finished)
    return [worst if s is None else s for s in scores]


# ---- a random-search sweep's results --------------------------------------------------------------------


def summarise(summary: dict, specs: list, results: dict[str, dict], failed: dict[str, dict]) -> dict[str, Any]:
    """Per model (release x init) and task: the finished trials' scores (None for a failed one), the
    curve at k = 1..N (N = finished trials) and the table's points at k = 1, 5 and N."""
    models: dict[str, dict] = {}
    for spec in specs:
        if spec.trial is None or (spec.name not in results and spec.name not in failed):
            continue
        model = models.setdefault(
            spec.model,
            {
                "mixer": _mixer(spec.config["release"]),
                "release": spec.config["release"],
                "from_scratch": spec.config["from_scratch"],
                "tasks": {},
            },
        )
        trials = model["tasks"].setdefault(spec.task, {"trials": []})["trials"]
        entry: dict[str, Any] = {"trial": spec.trial, "run": spec.name, "score": None}
        if spec.name in results:
            entry["score"] = results[spec.name]["score"]
        else:
            entry["failed"] = f"{failed[spec.name]['kind']}: {failed[spec.name]['reason']}"
        trials.append(entry)
    for model in models.values():
        for task in model["tasks"].values():
            task["trials"].sort(key=lambda t: t["trial"])
            scores = with_failures([t["score"] for t in task["trials"]])
            task["n"] = len(task["trials"])
            task["failed"] = sum(1 for t in task["trials"] if t["score"] is None)
            task["curve"] = curve(scores) if scores else []
            task["table"] = {
                str(k): _point(scores, k) for k in (*TABLE_KS, len(scores)) if scores
            }  # keys "1", "5", "N's value"
    return {"failed_trials": FAILED_CONVENTION, "models": models}


def _point(scores: list[float], k: int) -> dict[str, float]:
    mean, std = expected_max(scores, k)
    return {"k": k, "mean": mean, "std": std}


def _mixer(release: str) -> str:
    from hypermixer import read_release_config

    try:
        return str(read_release_config(release)["encoder"].mixer)
    except (OSError, ValueError):  # the release moved since planning: the table still has the rest
        return "?"


def tasks_of(evp: dict) -> list[str]:
    from finetune.tasks import GLUE_TASKS

    found = {task for model in evp["models"].values() for task in model["tasks"]}
    return [t for t in GLUE_TASKS if t in found] + sorted(found - set(GLUE_TASKS))


def markdown(summary: dict) -> str:
    """A random-search sweep's EVP section: per model and task, the expected best dev score after 1, 5 and N
    trials."""
    above = "In the tables above each trial is its own setting, so their 'median over seeds' is a single trial's score."
    lines = ["", "## Expected validation performance (random search)", "", *table_lines(summary["evp"], above)]
    return "\n".join(lines) + "\n"


def table_lines(evp: dict, remark: str = "") -> list[str]:
    """What the EVP table reads (and `remark`), then the table: per model and task, k = 1, 5 and N."""
    lines = [
        "The expected best dev task score (x100; a task's score is the mean of its metrics) after k trials "
        "drawn from the N finished ones, ± one standard deviation (Dodge et al. 2019: exact, from order "
        "statistics). A higher value at small k means a good model with less tuning. Failed trials: "
        f"{FAILED_CONVENTION}." + (f" {remark}" if remark else ""),
        "",
        "| Model | Mixer | Init | Task | N | Failed | k=1 | k=5 | k=N |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for task in tasks_of(evp):
        for label, model in evp["models"].items():
            entry = model["tasks"].get(task)
            if entry is None:
                continue
            init = "scratch" if model["from_scratch"] else "pretrained"
            cells = (
                [_band(entry["table"].get(str(k))) for k in (*TABLE_KS, entry["n"])] if entry["table"] else ["-"] * 3
            )
            lines.append(
                f"| {label} | {model['mixer']} | {init} | {task} | {entry['n']} | {entry['failed']} | "
                + " | ".join(cells)
                + " |"
            )
    return lines


def _band(point: dict | None) -> str:
    return "-" if point is None else f"{100 * point['mean']:.1f} ± {100 * point['std']:.1f}"


def plot_tasks(summary: dict, out_dir: Path) -> list[Path]:
    """evp-<task>.png per task: the expected best dev score against trials, a curve and band per model
    (dashed: from scratch)."""
    written = []
    evp = summary["evp"]
    for task in tasks_of(evp):
        path = Path(out_dir) / f"evp-{task}.png"
        plot_task(evp, task, path)
        written.append(path)
    return written


def plot_task(evp: dict, task: str, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, safe in batch jobs
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for label, model in evp["models"].items():
        points = model["tasks"].get(task, {}).get("curve")
        if not points:
            continue
        k = np.array([p["k"] for p in points])
        mean = 100 * np.array([p["mean"] for p in points])
        std = 100 * np.array([p["std"] for p in points])
        (line,) = ax.plot(k, mean, linestyle="--" if model["from_scratch"] else "-", label=label, marker=".")
        ax.fill_between(k, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("trials (k hyperparameter settings tried)")
    ax.set_ylabel("expected best dev score (x100), ± std")
    ax.set_title(f"{task}: expected validation performance")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize="small")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
