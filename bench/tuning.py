"""Tuning cost: how good a model do k random-search trials give, for each mixer? Expected validation
performance (Dodge et al. 2019) of the four mixers on SST-2 and a sentence-pair task.

    python -m bench.tuning                               # from scratch: 4 mixers x 2 tasks x 20 trials
    python -m bench.tuning --release hm=PATH --release tf=PATH   # and from these pretrained releases
    python -m bench.tuning --release hm=PATH --release tf=PATH --pretrained-only --out DIR   # these alone
    python -m bench.tuning --quick                       # the whole code path at toy size, a couple of minutes

Every mixer and task gets the same search space and the same trials (hyperparameters and training
seeds): `python -m finetune sweep --search random`'s machinery, in one sweep folder (<out>/sweep).
Models:
- a given release (`--release NAME=FOLDER`, a release from `pretrain.export`: the demo's or
  bench.quality's): fine-tuned from its weights, and from random weights of the same config and tokenizer;
- each mixer without a given release: from random weights, with the first release's shape and tokenizer
  (its mixer swapped), or with no release given, the `tiny` preset and a WordPiece tokenizer trained on
  the tasks' training sentences.
With `--pretrained-only`, the given releases are fine-tuned from their weights and nothing else: the
from-scratch curves are then those of a run without releases (a third of the trials where two releases
are given, since each would otherwise bring two from-scratch models).
Trials run interleaved (trial 0 of every model and task, then trial 1, ...), so an interrupted run
still compares the mixers at equal trials; a rerun continues where it stopped (finished trials are
kept). Writes results.json (with the exact command), results.md and evp-<task>.png into --out after every
trial, and trials.json: each finished trial's result (or failure) by name. The sweep folder is not kept by
git, so on a fresh clone the committed trials.json is what a rerun continues from: its trials are put back
into the planned sweep and not trained again. A trial fine-tuned from a release records the digest of the
release's weights, and a rerun whose release folder holds other weights is refused: release folders are not
kept by git either, and a release pretrained again on another machine is another model.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.sweep import RunSpec

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_GLUE = ROOT.parent / "shared" / "data" / "glue"
DEFAULT_OUT = ROOT / "bench" / "results" / "tuning"
QUICK_OUT = ROOT / "runs" / "bench" / "tuning-quick"
TRIALS_FILE = "trials.json"  # in --out: every finished trial's result.json (or failed.json), by trial name
PAIR_TASKS = ("MRPC", "RTE")
PAPER_CLAIM = (
    "HyperMixer needs less hyperparameter tuning than the Transformer: its expected validation performance "
    "rises faster with the number of random-search trials (Mai et al., ACL 2023, who also use Dodge et al.'s "
    "expected validation performance)."
)


@dataclass(frozen=True)
class Size:
    trials: int
    sst2_examples: int  # SST-2 training examples (a seeded subset)
    pair_examples: int | None  # the pair task's training examples (None: all)
    sst2_seq_len: int
    pair_seq_len: int
    space: str  # a shipped preset, or "quick" (written into --out)
    shape: dict  # encoder shape of the from-scratch models when no release is given
    vocab_size: int


FULL = Size(
    trials=20,
    sst2_examples=8000,
    pair_examples=None,
    sst2_seq_len=64,
    pair_seq_len=128,
    space="small",
    shape=dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512, max_seq_len=128),  # `tiny`
    vocab_size=8192,
)
QUICK = Size(
    trials=4,
    sst2_examples=200,
    pair_examples=120,
    sst2_seq_len=32,
    pair_seq_len=48,
    space="quick",
    shape=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=48),
    vocab_size=1000,
)
# The toy space of --quick: every kind of distribution, one epoch.
QUICK_SPACE = {
    "description": "bench.tuning --quick: the code path, not a measurement",
    "learning_rate": {"kind": "log_uniform", "low": 3e-4, "high": 3e-3},
    "batch_size": {"kind": "choice", "values": [16, 32]},
    "epochs": {"kind": "choice", "values": [1]},
    "warmup_ratio": {"kind": "uniform", "low": 0.0, "high": 0.2},
    "weight_decay": {"kind": "uniform", "low": 0.0, "high": 0.1},
    "dropout": {"kind": "uniform", "low": 0.0, "high": 0.1},
}


class BenchError(Exception):
    """A one-line, user-facing error."""


def log(message: str) -> None:
    print(f"bench.tuning: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tuning", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the whole code path at toy size (a couple of minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT}, or {QUICK_OUT} with --quick)"
    )
    parser.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help="GLUE folder with SST-2 and the pair task")
    parser.add_argument(
        "--release",
        action="append",
        default=[],
        dest="releases",
        metavar="NAME=FOLDER",
        help="a pretrained release to fine-tune (and its random-init twin); repeat for several",
    )
    parser.add_argument(
        "--pretrained-only",
        action="store_true",
        help="with --release: fine-tune the releases from their weights only (no model from random weights)",
    )
    parser.add_argument(
        "--pair-task", choices=PAIR_TASKS, default="MRPC", help="the sentence-pair task (default: MRPC)"
    )
    parser.add_argument("--trials", type=int, default=None, help="trials per model and task (default: 20; quick: 4)")
    parser.add_argument("--space", default=None, help="search space: a file or a shipped preset (default: small)")
    parser.add_argument("--search-seed", type=int, default=0, help="the trials' seed (default: 0)")
    parser.add_argument(
        "--max-train-examples", type=int, default=None, help="SST-2 training examples (default: 8000; quick: 200)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: auto)")
    args = parser.parse_args(argv)
    if args.trials is not None and args.trials < 1:
        parser.error(f"--trials must be at least 1, got {args.trials}")
    if args.pretrained_only and not args.releases:
        parser.error("--pretrained-only needs at least one --release NAME=FOLDER")
    return args


def run(argv: list[str]) -> int:
    from finetune.search import load_space
    from finetune.sweep import aggregate, load_plan, run_one

    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    trials = args.trials or size.trials
    sst2_examples = args.max_train_examples or size.sst2_examples
    tasks = {"SST-2": (sst2_examples, size.sst2_seq_len), args.pair_task: (size.pair_examples, size.pair_seq_len)}
    for task in tasks:
        if not (args.glue_dir / task / "train.tsv").is_file() or not (args.glue_dir / task / "dev.tsv").is_file():
            raise BenchError(f"{args.glue_dir / task}: no train.tsv and dev.tsv (set the GLUE folder with --glue-dir)")
    out.mkdir(parents=True, exist_ok=True)
    space = args.space or size.space
    if space == "quick" and args.quick:
        space_file = out / "space-quick.json"
        space_file.write_text(json.dumps(QUICK_SPACE, indent=2) + "\n")
        space = str(space_file)
    load_space(space)  # a mistake in the space: reported before any model is built

    models = make_models(args.releases, size, args.glue_dir, list(tasks), out / "releases", args.pretrained_only)
    sweep_dir = out / "sweep"
    from finetune.search import plan_random

    for task, (examples, seq_len) in tasks.items():
        settings = dict(
            glue_dir=str(args.glue_dir),
            max_train_examples=examples,
            max_seq_len=seq_len,
            device=args.device,
            save_model=False,
            predict_test=False,
        )
        for releases, init in models:
            plan_random(sweep_dir, releases, task, space, trials, args.search_seed, init, **settings)
    specs = [s for s in load_plan(sweep_dir) if s.trial is not None and s.trial < trials]
    specs.sort(key=lambda s: (s.trial, s.task, s.model))  # interleaved: equal trials for all at any time
    log(f"{len(specs)} trials planned in {sweep_dir} ({len({s.model for s in specs})} models, {len(tasks)} tasks)")
    recorded = restore_trials(specs, out / TRIALS_FILE)
    majority = majority_scores(args.glue_dir, list(tasks))  # read once: the report is rewritten after every trial
    started = time.perf_counter()
    for number, spec in enumerate(specs, start=1):
        log(f"trial {number}/{len(specs)}: {spec.name}")
        run_one(spec, progress=False)
        if record_trial(spec, recorded, out / TRIALS_FILE):  # a new trial: the partial results go on record too
            write_results(out, aggregate(sweep_dir), argv, trials, tasks, space, args, sweep_dir, majority)
    log(f"trials done in {time.perf_counter() - started:.0f} s")
    summary = aggregate(sweep_dir)
    write_results(out, summary, argv, trials, tasks, space, args, sweep_dir, majority)
    print((out / "results.md").read_text())
    return 0


def make_models(
    releases: list[str], size: Size, glue_dir: Path, tasks: list[str], folder: Path, pretrained_only: bool = False
) -> list[tuple[list[str], tuple[str, ...]]]:
    """(releases as LABEL=FOLDER, inits) to plan: the given releases pretrained and from scratch, and the
    mixers without one from scratch (made here); or, `pretrained_only`, the given releases pretrained alone."""
    from hypermixer import MIXERS, read_release_config

    given: dict[str, tuple[str, Path]] = {}  # mixer -> (label, folder)
    for item in releases:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise BenchError(f"--release {item!r}: expected NAME=FOLDER")
        try:
            mixer = read_release_config(path)["encoder"].mixer
        except (OSError, ValueError) as err:
            raise BenchError(f"--release {item}: not a release folder ({str(err).splitlines()[0]})") from None
        if mixer in given:
            raise BenchError(f"--release {item}: a second {mixer} release (one per mixer: {given[mixer][0]})")
        given[mixer] = (label, Path(path).resolve())
    models: list[tuple[list[str], tuple[str, ...]]] = []
    if given:
        inits = ("pretrained",) if pretrained_only else ("pretrained", "scratch")
        models.append(([f"{label}={path}" for label, path in given.values()], inits))
    missing = [] if pretrained_only else [m for m in MIXERS if m not in given]
    if missing:
        made = scratch_releases(
            missing, next(iter(given.values()))[1] if given else None, size, glue_dir, tasks, folder
        )
        models.append(([f"{mixer}={path}" for mixer, path in made.items()], ("scratch",)))
    return models


def scratch_releases(
    mixers: list[str], like: Path | None, size: Size, glue_dir: Path, tasks: list[str], folder: Path
) -> dict[str, Path]:
    """A release folder per mixer with random weights: `like`'s config (mixer swapped) and tokenizer, or
    the size's shape and a tokenizer trained on the tasks' training sentences. Made once, then reused."""
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM, read_release_config

    tokenizer_file = like / "tokenizer.json" if like else folder / "tokenizer.json"
    if like:
        base = read_release_config(like)["encoder"]
    else:
        if not tokenizer_file.is_file():
            train_tokenizer(glue_dir, tasks, size.vocab_size, tokenizer_file)
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
        base = EncoderConfig(vocab_size=vocab, **size.shape)
    made = {}
    for mixer in mixers:
        target = folder / mixer
        if not (target / "model.safetensors").is_file():
            config = EncoderConfig.from_dict({**base.to_dict(), "mixer": mixer})
            torch.manual_seed(0)
            staging = folder / f".{mixer}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            ForMaskedLM(config).save_pretrained(staging)
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        made[mixer] = target
    return made


def train_tokenizer(glue_dir: Path, tasks: list[str], vocab_size: int, path: Path) -> None:
    """A WordPiece tokenizer from the tasks' training sentences (train.tsv only; dev is never read)."""
    from data_pipeline.tokenizer import train_tokenizer as train_wordpiece
    from finetune.data import read_split
    from finetune.tasks import get_task

    texts: list[str] = []
    for name in tasks:
        task = get_task(name)
        assert task.train is not None  # SST-2 and the pair tasks have training sets
        examples = read_split(task, task.train, glue_dir=str(glue_dir))
        texts += examples.text_a + (examples.text_b or [])
    tokenizer = train_wordpiece(texts, vocab_size=vocab_size, min_frequency=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))


# ---- the report ------------------------------------------------------------------------------------------


def trial_settings(spec: RunSpec) -> dict:
    """What makes a trial the same trial in another clone: its drawn values and seed, not its folders; and
    for a pretrained model, the digest of the weights it starts from. Release folders are not kept by git,
    and a release pretrained again on another machine is another model (it drifts once it leaves the
    plateau), so a trial of the same name must not be taken for one trained from the weights now there.
    (A model from random weights is made here from a fixed seed: its config and tokenizer say what it is.)"""
    from finetune.model import release_digest
    from finetune.search import PARAMETERS

    settings = {key: spec.config[key] for key in (*PARAMETERS, "seed", "max_train_examples", "max_seq_len")}
    if not spec.config["from_scratch"]:
        settings["release_sha256"] = release_digest(spec.config["release"], from_scratch=False)
    return settings


def _difference(recorded: dict, planned: dict) -> str:
    """What differs between a recorded trial's settings and the plan's, for the refusal."""
    if {k: v for k, v in recorded.items() if k != "release_sha256"} == {
        k: v for k, v in planned.items() if k != "release_sha256"
    }:
        if "release_sha256" not in recorded:
            return "was recorded without the digest of the release it started from, so it cannot be told apart"
        return (
            f"started from other weights (model.safetensors sha256 {recorded['release_sha256'][:12]}..., "
            f"{planned['release_sha256'][:12]}... now)"
        )
    return f"was recorded with {recorded}, planned now with {planned}"


def restore_trials(specs: list[RunSpec], path: Path) -> dict:
    """Put the trials recorded in `path` back into their planned run folders (result.json or failed.json), so
    the sweep skips them; a recorded trial whose drawn values differ from the plan's is refused."""
    from common.files import write_json_atomic
    from finetune.search import FAILED_FILE
    from finetune.trainer import RESULT_FILE

    recorded = json.loads(path.read_text()) if path.is_file() else {}
    for spec in specs:
        entry = recorded.get(spec.name)
        if entry is None or (spec.output_dir / RESULT_FILE).is_file() or (spec.output_dir / FAILED_FILE).is_file():
            continue
        if entry["settings"] != trial_settings(spec):
            raise BenchError(
                f"{path}: trial {spec.name} {_difference(entry['settings'], trial_settings(spec))}; use another --out"
            )
        spec.output_dir.mkdir(parents=True, exist_ok=True)
        if "result" in entry:
            write_json_atomic(spec.output_dir / RESULT_FILE, entry["result"])
        else:
            write_json_atomic(spec.output_dir / FAILED_FILE, entry["failed"])
    return recorded


def record_trial(spec: RunSpec, recorded: dict, path: Path) -> bool:
    """Add a finished trial to `path` (rewritten atomically); False when it was already there."""
    from common.files import write_json_atomic
    from finetune.search import FAILED_FILE
    from finetune.trainer import RESULT_FILE

    result, failed = spec.output_dir / RESULT_FILE, spec.output_dir / FAILED_FILE
    if not result.is_file() and not failed.is_file():
        return False
    entry = {"settings": trial_settings(spec)}
    entry |= (
        {"result": json.loads(result.read_text())} if result.is_file() else {"failed": json.loads(failed.read_text())}
    )
    if recorded.get(spec.name) == entry:
        return False
    recorded[spec.name] = entry
    write_json_atomic(path, recorded)
    return True


def write_results(
    out: Path,
    summary: dict,
    argv: list[str],
    trials: int,
    tasks: dict,
    space: str,
    args: argparse.Namespace,
    sweep_dir: Path,
    majority: dict[str, float],
) -> None:
    from common.files import write_json_atomic, write_text_atomic
    from finetune import evp
    from finetune.search import load_space

    command = shlex.join(["python", "-m", "bench.tuning", *argv])
    evp_summary = summary["evp"]
    comparisons = compare(evp_summary)
    seconds = [
        json.loads((s / "result.json").read_text())["seconds"]
        for s in (sweep_dir / "runs").iterdir()
        if (s / "result.json").is_file()
    ]
    report = {
        "command": command,
        "setup": {
            "trials_per_model_and_task": trials,
            "search_seed": args.search_seed,
            "space": load_space(space).record(),
            "tasks": {task: {"max_train_examples": n, "max_seq_len": length} for task, (n, length) in tasks.items()},
            "glue_dir": str(args.glue_dir),
            "releases": args.releases,
            "sweep_dir": str(sweep_dir),
        },
        "trials_done": summary["runs_done"],
        "trials_failed": summary["failed_runs"],
        "trials_missing": summary["missing_runs"],
        "trial_seconds": {"total": round(sum(seconds), 1), "mean": round(sum(seconds) / max(1, len(seconds)), 2)},
        "majority_baseline": majority,
        "paper_claim": PAPER_CLAIM,
        "hypermixer_vs_transformer": comparisons,
        "evp": evp_summary,
    }
    write_json_atomic(out / "results.json", report)
    evp.plot_tasks(summary, out)
    write_text_atomic(out / "results.md", markdown(report))


def majority_scores(glue_dir: Path, tasks: list[str]) -> dict[str, float]:
    """Each task's dev score when every dev example gets the training set's most frequent label: the floor
    that a model which learned something clears."""
    from collections import Counter

    from finetune.data import read_split
    from finetune.metrics import compute, task_score
    from finetune.tasks import get_task

    scores = {}
    for name in tasks:
        task = get_task(name)
        assert task.train is not None and task.evals[0].dev is not None  # SST-2 and the pair tasks have both
        train = read_split(task, task.train, glue_dir=str(glue_dir)).labels or []
        dev = read_split(task, task.evals[0].dev, glue_dir=str(glue_dir)).labels or []
        most = Counter(train).most_common(1)[0][0]
        scores[name] = task_score({name: compute(task.metrics, dev, [most] * len(dev))})
    return scores


def compare(evp_summary: dict) -> list[dict]:
    """Per task and init: HyperMixer against the transformer at k = 1, 5 and N, and whether the gap is
    wider than the two bands together (a reading, not a test)."""
    out = []
    by_key: dict[tuple[str, bool], dict[str, dict]] = {}
    for model in evp_summary["models"].values():
        for task, entry in model["tasks"].items():
            by_key.setdefault((task, model["from_scratch"]), {})[model["mixer"]] = entry
    for (task, scratch), mixers in sorted(by_key.items()):
        if "hypermixer" not in mixers or "transformer" not in mixers:
            continue
        hm, tf = mixers["hypermixer"], mixers["transformer"]
        n = min(len(hm["curve"]), len(tf["curve"]))
        if n == 0:
            continue
        points = []
        for k in sorted({1, min(5, n), n}):
            a, b = hm["curve"][k - 1], tf["curve"][k - 1]
            gap = a["mean"] - b["mean"]
            clear = abs(gap) > a["std"] + b["std"]
            leader = "hypermixer" if gap > 0 else "transformer" if gap < 0 else "neither"
            points.append({"k": k, "gap": gap, "ahead": leader if clear else "within the bands"})
        out.append({"task": task, "init": "scratch" if scratch else "pretrained", "points": points})
    return out


def markdown(report: dict) -> str:
    """results.md: the command, the tables and the plots."""
    from finetune import evp

    plots = ", ".join(f"`evp-{t}.png`" for t in evp.tasks_of(report["evp"]))
    lines = ["# Tuning cost: expected validation performance per mixer", "", f"Command: `{report['command']}`", ""]
    return "\n".join([*lines, *tables(report), "", f"Plots: {plots}."]) + "\n"


def tables(report: dict) -> list[str]:
    """The setup in a paragraph, the EVP table, and HyperMixer against the transformer beside the paper's
    claim (also bench.report's section for this result)."""
    from finetune import evp

    setup = report["setup"]
    tasks = ", ".join(f"{t} ({v['max_train_examples'] or 'all'} training examples)" for t, v in setup["tasks"].items())
    lines = [
        f"Random search, {setup['trials_per_model_and_task']} trials per model and task, the same trials "
        f"(hyperparameters and training seeds, search seed {setup['search_seed']}) for every mixer; tasks: {tasks}. "
        f"{report['trials_done']} trials finished, {len(report['trials_failed'])} failed, "
        f"{len(report['trials_missing'])} not run; {report['trial_seconds']['total']:.0f} s of fine-tuning in all.",
        "",
        "Space: " + "; ".join(f"{name} {_dist(d)}" for name, d in setup["space"].items()) + ".",
        "",
        *evp.table_lines(report["evp"]),
        "",
        "Majority-class baseline (every dev example gets the training set's most frequent label; x100): "
        + ", ".join(f"{task} {100 * score:.1f}" for task, score in report["majority_baseline"].items())
        + ". A curve near it has learned little from the task.",
        "",
        f"Against the paper. The paper: {report['paper_claim']}",
        "",
    ]
    if not report["hypermixer_vs_transformer"]:
        lines.append("Here: no HyperMixer and transformer pair with finished trials to compare.")
    for row in report["hypermixer_vs_transformer"]:
        parts = [f"k={p['k']}: {100 * p['gap']:+.1f} ({p['ahead']})" for p in row["points"]]
        lines.append(f"- {row['task']}, {row['init']}: HyperMixer minus transformer, " + "; ".join(parts) + ".")
    lines += [
        "",
        "A gap counts as a lead only when it is wider than the two bands (± one std each) together; "
        "otherwise the curves do not separate at this number of trials.",
    ]
    return lines


def _scientific(value: float) -> str:
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def _dist(d: dict) -> str:
    if d["kind"] == "choice":
        return "from {" + ", ".join(f"{v:g}" for v in d["values"]) + "}"
    if d["kind"] == "log_uniform":  # written as the space files write them (1e-4), not as 0.0001
        return f"log-uniform in [{_scientific(d['low'])}, {_scientific(d['high'])}]"
    return f"{d['kind']} in [{d['low']:g}, {d['high']:g}]"


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import FinetuneError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except (BenchError, FinetuneError) as err:
        print(f"bench.tuning: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
