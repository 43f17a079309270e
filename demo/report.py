"""The demo's results: one table (printed, results.md, results.json) and two plots, read from what
the stages wrote: pretraining's metrics.jsonl and the fine-tuning sweep's result.json files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from common.files import atomic_path
from demo.sizes import CORPUS_NAME, GLUE_DIR, TASK


def collect(out: Path, mixers: list[str], stamps: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every number of the table, from the stages' own files."""
    from finetune.sweep import load_plan
    from finetune.trainer import RESULT_FILE
    from pretrain.metrics import read_metrics

    rows, curves = [], {}
    for mixer in mixers:
        records = read_metrics(out / f"pretrain-{mixer}")
        train = [r for r in records if r["kind"] == "train"]
        evals = [r for r in records if r["kind"] == "eval"]
        curves[mixer] = {
            "train_steps": [r["step"] for r in train],
            "train_loss": [r["loss"] for r in train],
            "eval_steps": [r["step"] for r in evals],
            "eval_loss": [r["loss"] for r in evals],
        }
        pre = {
            "steps": train[-1]["step"] if train else 0,
            "seconds": stamps.get(f"pretrain-{mixer}", {}).get("seconds"),
            "resumed": bool(stamps.get(f"pretrain-{mixer}", {}).get("resumed")),
            "tokens_per_s": train[-1]["tokens_per_s"] if train else None,
            "mlm_loss": evals[-1]["loss"] if evals else None,
            "mlm_accuracy": evals[-1]["accuracy"] if evals else None,
        }
        for spec in load_plan(out / f"finetune-{mixer}"):
            result = json.loads((spec.output_dir / RESULT_FILE).read_text())
            scratch = bool(spec.config["from_scratch"])
            rows.append(
                {
                    "mixer": mixer,
                    "init": "scratch" if scratch else "pretrained",
                    "model": spec.model,
                    "parameters": result["parameters"],
                    "pretraining": None if scratch else pre,
                    "task": TASK,
                    "dev_accuracy": result["dev"][TASK]["accuracy"],
                    "best_epoch": result["best_epoch"],
                    "epochs": spec.config["epochs"],
                    "learning_rate": spec.config["learning_rate"],
                    "train_examples": result["train_examples"],
                    "finetune_seconds": result["seconds"],
                    "run_dir": str(spec.output_dir),
                }
            )
    return {"task": TASK, "majority_class_accuracy": majority_accuracy(), "rows": rows, "curves": curves}


def majority_accuracy() -> float:
    """Dev accuracy of always answering the most frequent dev label: the floor to beat."""
    with (GLUE_DIR / TASK / "dev.tsv").open(newline="") as f:
        labels = [row["label"] for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return max(labels.count(v) for v in set(labels)) / len(labels)


HEADERS = (
    "model",
    "init",
    "parameters",
    "pretraining",
    "MLM loss (val)",
    "MLM accuracy (val)",
    f"{TASK} dev accuracy",
    "fine-tuning",
)


def cells(results: dict[str, Any]) -> list[list[str]]:
    """One row of text cells per fine-tuned model."""
    out = []
    for r in results["rows"]:
        pre = r["pretraining"]
        if pre:
            took = f", {pre['seconds'] / 60:.1f} min" if pre["seconds"] is not None else ""
            took += " (after a resume: the last part)" if pre["resumed"] else ""
            rate = f", {pre['tokens_per_s']:,.0f} tok/s" if pre["tokens_per_s"] else ""
            pretraining = f"{pre['steps']} steps{took}{rate}"
            loss = f"{pre['mlm_loss']:.3f}" if pre["mlm_loss"] is not None else "-"
            acc = f"{100 * pre['mlm_accuracy']:.1f}%" if pre["mlm_accuracy"] is not None else "-"
        else:
            pretraining, loss, acc = "none (random init)", "-", "-"
        finetuning = (
            f"{r['train_examples']:,} examples, epoch {r['best_epoch']} of {r['epochs']}, "
            f"lr {r['learning_rate']:g}, {r['finetune_seconds']:.0f} s"
        )
        out.append(
            [
                r["mixer"],
                r["init"],
                f"{r['parameters']:,}",
                pretraining,
                loss,
                acc,
                f"{100 * r['dev_accuracy']:.1f}%",
                finetuning,
            ]
        )
    return out


def footnote(results: dict[str, Any]) -> str:
    return (
        f"Majority class on {TASK} dev: {100 * results['majority_class_accuracy']:.1f}%. One seed and one "
        "learning rate per row: a demonstration of the pipeline, not a benchmark."
    )


def markdown(results: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|---|---|---:|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells(results)]
    return "\n".join(lines) + "\n\n" + footnote(results) + "\n"


def aligned(results: dict[str, Any]) -> str:
    """The same table for a terminal: padded columns."""
    rows = [list(HEADERS), *cells(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADERS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n\n" + footnote(results) + "\n"


def plots(results: dict[str, Any], out: Path) -> list[Path]:
    """pretraining.png (MLM loss per step) and finetuning.png (dev accuracy per model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mixer, c in results["curves"].items():
        (line,) = ax.plot(c["train_steps"], c["train_loss"], alpha=0.45, label=f"{mixer} (train)")
        ax.plot(c["eval_steps"], c["eval_loss"], marker="o", color=line.get_color(), label=f"{mixer} (validation)")
    ax.set(xlabel="optimizer step", ylabel="masked-LM loss", title=f"Pretraining on {CORPUS_NAME}")
    ax.grid(alpha=0.3)
    ax.legend()
    written.append(_save(fig, out / "pretraining.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = results["rows"]
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    inits = list(dict.fromkeys(r["init"] for r in rows))
    width = 0.3
    for i, init in enumerate(inits):
        xs, ys = [], []
        for j, mixer in enumerate(mixers):
            for r in rows:
                if r["mixer"] == mixer and r["init"] == init:
                    xs.append(j + (i - (len(inits) - 1) / 2) * width)
                    ys.append(100 * r["dev_accuracy"])
        bars = ax.bar(xs, ys, width, label=init)
        ax.bar_label(bars, fmt="%.1f")
    ax.axhline(100 * results["majority_class_accuracy"], color="grey", linestyle="--", label="majority class")
    ax.set_xticks(range(len(mixers)), mixers)
    ax.set_xlim(-0.6, len(mixers) - 0.4)
    ax.set(ylabel=f"{TASK} dev accuracy (%)", ylim=(0, 100), title=f"Fine-tuning on the {TASK} sample")
    ax.legend(loc="lower right")
    written.append(_save(fig, out / "finetuning.png"))
    plt.close(fig)
    return written


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    return path


def write(results: dict[str, Any], out: Path) -> tuple[str, list[Path]]:
    """results.md, results.json, the plots; returns the table and the files written."""
    text = aligned(results)
    from common.files import write_json_atomic, write_text_atomic

    write_text_atomic(out / "results.md", f"# Demo results\n\n{markdown(results)}")
    write_json_atomic(out / "results.json", {k: v for k, v in results.items() if k != "curves"})
    return text, [out / "results.md", out / "results.json", *plots(results, out)]
