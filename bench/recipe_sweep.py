"""The pretraining recipe on a real corpus, one setting at a time: short runs of both mixers at an equal
token budget, each changing one setting of the shipped `cpu` recipe, their held-out curves kept.

    python -m bench.recipe_sweep              # IMDB, 5M tokens per run, in bench.corpus's results folder
    python -m bench.recipe_sweep --quick      # toy size (the test)

Every run reads bench.corpus's data folder in --out (built there, or here when absent): the same training
shards, and the same held-out documents with the same masks as the corpus runs. Each variant changes one
thing: the peak learning rate, the global batch (at the same tokens, so fewer steps), the warmup, tied
hypernetworks (hypermixer only) or post-LN blocks. The learning-rate schedule (warmup, then linear decay to
zero) spans each run's own budget. A rerun skips finished runs and continues an interrupted one from its
checkpoint; a run that fails is recorded with its reason and the sweep goes on.

Writes sweep.json and sweep.png into --out (bench.report shows them beside the corpus results).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import (
    DEFAULT_OUT,
    FULL,
    QUICK,
    SEQ_LEN,
    Budget,
    CorpusData,
    add_corpus_arguments,
    check_corpus_arguments,
    prepare_data,
    tokens_label,
)
from bench.quality import ROOT, WARMUP_FRACTION, BenchError, Size, log, plot_curves, pretrain

MIXERS = ("hypermixer", "transformer")


@dataclass(frozen=True)
class Variant:
    name: str
    change: str  # what differs from the recipe, for the table
    sets: tuple[str, ...] = ()
    batch_factor: int = 1  # global batch x this and steps / this: the same tokens
    warmup_fraction: float = WARMUP_FRACTION
    mixers: tuple[str, ...] = MIXERS


VARIANTS = (
    Variant("recipe", "the shipped cpu recipe (peak lr 2e-3, batch 64, warmup 1/16 of the steps, pre-LN)"),
    Variant("lr1e-3", "peak lr 1e-3", ("optim.lr=0.001",)),
    Variant("lr4e-3", "peak lr 4e-3", ("optim.lr=0.004",)),
    Variant("batch128", "global batch 128, half the steps", batch_factor=2),
    Variant("warmup25", "warmup 1/4 of the steps", warmup_fraction=0.25),
    Variant("post-ln", "post-LN blocks (BERT's layout)", ("model.norm_position=post",)),
    Variant("tied", "tied hypernetworks (W1 = W2)", ("model.hypermixer_tied=true",), mixers=("hypermixer",)),
)
BY_NAME = {v.name: v for v in VARIANTS}
DEFAULT_TOKENS = 5_000_000
EVALUATIONS = 8  # held-out evaluations per run, at the same token counts for every batch


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.recipe_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy size: a model of 2 small layers, a few steps")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"bench.corpus's results folder (default: {DEFAULT_OUT})"
    )
    add_corpus_arguments(parser)
    parser.add_argument("--models", default=",".join(MIXERS), help=f"comma-separated, from {','.join(MIXERS)}")
    parser.add_argument(
        "--variants", default=",".join(BY_NAME), help=f"comma-separated, in this order, from {','.join(BY_NAME)}"
    )
    parser.add_argument("--tokens", type=float, default=None, help=f"per run (default: {DEFAULT_TOKENS:,})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    check_corpus_arguments(args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for flag, given, known in (("--models", args.models, MIXERS), ("--variants", args.variants, tuple(BY_NAME))):
        unknown = [x for x in given if x not in known]
        if unknown or not given:
            raise BenchError(
                f"{flag}: unknown {unknown[0] if unknown else 'empty list'!r} (choose from {','.join(known)})"
            )
    return args


def run_size(budget: Budget, variant: Variant, tokens: int) -> Size:
    """The variant's batch and step count for `tokens`, with evaluations at the same token counts."""
    batch = budget.global_batch * variant.batch_factor
    steps = max(EVALUATIONS, round(tokens / (batch * SEQ_LEN)) // EVALUATIONS * EVALUATIONS)
    return budget.pretraining_size(steps, steps // EVALUATIONS, global_batch=batch)


def sweep_run(
    name: str, mixer: str, variant: Variant, budget: Budget, tokens: int, data: CorpusData, out: Path, seed: int
) -> dict:
    size = run_size(budget, variant, tokens)
    steps = size.steps
    sets = (
        f"optim.warmup_steps={max(1, round(variant.warmup_fraction * steps))}",
        f"checkpoint.every_steps={steps // 2}",  # an interrupted run loses at most half of itself
        "checkpoint.keep_last=1",
        f"seed={seed}",
        *variant.sets,
    )
    try:
        curve = pretrain(name, mixer, size, data.train, data.heldout, out, steps, extra_sets=sets)
    except RuntimeError as err:  # diverged or crashed: recorded, and the other runs still run
        log(f"  {name} failed: {str(err).splitlines()[0]}")
        return {"name": name, "mixer": mixer, "variant": variant.name, "error": str(err).splitlines()[0]}
    return {**curve, "variant": variant.name, "global_batch": size.global_batch, "sets": list(sets)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # a mistake: BenchError, one line and exit 2
    budget = QUICK if args.quick else FULL
    tokens = int(args.tokens or (2 * EVALUATIONS * QUICK.global_batch * SEQ_LEN if args.quick else DEFAULT_TOKENS))
    out = (args.out or (ROOT / "runs" / "bench" / "corpus-quick" if args.quick else DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(args, budget, out)
    runs = []
    for variant in (BY_NAME[v] for v in args.variants):  # both mixers per variant: a partial sweep still compares
        for mixer in (m for m in args.models if m in variant.mixers):
            runs.append(
                sweep_run(f"sweep-{mixer}-{variant.name}", mixer, variant, budget, tokens, data, out, args.seed)
            )
    finished = [r for r in runs if "error" not in r]
    plot_curves(finished, out / "sweep.png", f"recipe sweep: {tokens_label(tokens)} tokens per run, one change each")
    report = {
        "command": "python -m bench.recipe_sweep " + shlex.join(sys.argv[1:] if argv is None else argv),
        "recipe": "pretrain/configs/cpu.json",
        "sweep_tokens": tokens,
        "variants": {v.name: v.change for v in VARIANTS if v.name in args.variants},
        "cpu_count": os.cpu_count(),
        "runs": runs,
    }
    temp = out / "sweep.json.tmp"
    temp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(temp, out / "sweep.json")
    print("\n".join(table(report)))
    return 0


def table(report: dict) -> list[str]:
    """Each run's last held-out evaluation, and its difference from the same mixer's recipe run."""
    recipe = {r["mixer"]: r for r in report["runs"] if r.get("variant") == "recipe" and "error" not in r}
    lines = [
        f"Recipe sweep (`{report['command']}`): {report['sweep_tokens']:,} tokens per run, one change from "
        f"`{report['recipe']}` each; held-out MLM on the corpus's held-out documents (lower loss and higher "
        "accuracy are better).",
        "",
        "| mixer | variant | change | steps | held-out loss | held-out accuracy | Δ loss vs recipe | "
        "Δ accuracy vs recipe | tokens/s | done |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["runs"]:
        change = report["variants"].get(r["variant"], "")
        if "error" in r:
            lines.append(f"| {r['mixer']} | {r['variant']} | {change} | | failed: {r['error']} | | | | | |")
            continue
        base = recipe.get(r["mixer"])
        delta = (
            f"{r['loss'][-1] - base['loss'][-1]:+.3f} | {100 * (r['accuracy'][-1] - base['accuracy'][-1]):+.1f}"
            if base and r is not base
            else " | "
        )
        lines.append(
            f"| {r['mixer']} | {r['variant']} | {change} | {r['steps']:,} | {r['loss'][-1]:.3f} | "
            f"{100 * r['accuracy'][-1]:.1f}% | {delta} | {r['tokens_per_s']:,.0f} | {'yes' if r['done'] else 'no'} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
