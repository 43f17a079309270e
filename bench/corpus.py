"""Pretraining on a real corpus: held-out masked-LM curves against tokens and wall-clock, releases kept at
fixed token counts, and those releases read on out-of-domain text.

    python -m bench.corpus                  # IMDB from ../shared: 40M tokens per model; a rerun continues
    python -m bench.corpus --quick          # every stage at toy size on a sample of the corpus (the test)

1. data: the corpus documents (jsonl, with an id and a text field) are split by a hash of their id: a fixed
   `--heldout-fraction` of them (1%) is held out and never trained on; a held-out document whose text also
   occurs among the training documents (the corpus has a few exact duplicates) is dropped from the held-out
   set and counted. `data_pipeline build` makes the training shards and a WordPiece tokenizer, and, with the
   same tokenizer, shards of the held-out documents and of `--ood` text (WikiText-2's test split).
2. pretraining through `pretrain/main.py` with the shipped `cpu` recipe, per model and pretraining seed, at
   an equal token budget: evaluations on the held-out documents every `--eval-tokens`, a checkpoint at each
   release point (2.5M, 10M and 40M tokens by default) kept and exported as a release. An interrupted run
   continues from its newest checkpoint when the command is run again; a finished run is not repeated, and
   its releases are exported as soon as it ends (its checkpoints may then go).
3. held-out text: every release read on the held-out documents and on the out-of-domain text, with the
   same sequences and masks for every model (loss and accuracy over the masked tokens).

Writes results.json, results.md and PNGs into --out. results.json is also the record a rerun continues from:
the work files (data, checkpoints, releases, fine-tuning folders) are not kept by git, so on a fresh clone a
rerun skips every fine-tuning run, curve and reading that results.json holds, keeps them in the report even for
models not asked for this time, and pretrains a recorded run again (same data, seed and recipe) only when a
fine-tuning run still to do needs its releases; the rerun's distance from the recorded curve is reported.
The HF BERT reference (`bert-hf`) is pretrained and evaluated in step 2 like ours; its checkpoints are not
releases of this project, so step 3 reads ours only.
`--models transformer-post` (or `hypermixer-post`) runs our model with BERT's post-LN block layout.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shlex
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bench.quality import (
    DEFAULT_GLUE,
    ROOT,
    SHARED,
    VARIANTS,
    BenchError,
    Size,
    TaskRecipe,
    export,
    finetune,
    finetune_dir,
    log,
    machine,
    plot_curves,
    pretrain,
    pretraining_table,
    read_curve,
    summarize,
)
from bench.quality import FULL as QUALITY_FULL
from common.files import sha256_file

IMDB = SHARED / "corpus" / "imdb"
DEFAULT_CORPUS = (IMDB / "unsup.jsonl.gz", IMDB / "train.jsonl.gz")
DEFAULT_OOD = SHARED / "corpus" / "wikitext-2" / "test.txt"
DEFAULT_OUT = ROOT / "bench" / "results" / "corpus"
# `transformer-post`, `hypermixer-post`: BERT's post-LN block layout (bench.quality's variants)
MODELS = ("hypermixer", "transformer", "bert-hf", *VARIANTS)
SEQ_LEN = 128


@dataclass(frozen=True)
class Budget:
    """Token counts are rounded to whole optimizer steps of global_batch x 128 tokens."""

    release_tokens: tuple[int, ...]  # releases kept (and evaluated out of domain) at these token counts
    eval_tokens: int  # held-out evaluation every so many tokens
    global_batch: int
    eval_samples: int  # held-out sequences per evaluation (x ~19 masked tokens each)
    vocab_size: int
    procs: int
    max_documents: int | None = None  # a sample of the corpus (quick)
    model_sets: tuple[str, ...] = ()

    def steps(self, tokens: int) -> int:
        return max(1, round(tokens / (self.global_batch * SEQ_LEN)))

    def pretraining_size(
        self, steps: int, eval_every: int, global_batch: int | None = None, model_sets: tuple[str, ...] = ()
    ) -> Size:
        """The Size that bench.quality's `pretrain` takes for a pretraining-only run (no fine-tuning fields)."""
        return Size(
            steps=steps,
            global_batch=global_batch or self.global_batch,
            eval_every=eval_every,
            eval_samples=self.eval_samples,
            vocab_size=self.vocab_size,
            procs=self.procs,
            tasks=(),
            seeds=(),
            sweep_lrs=(),
            sweep_steps=0,
            model_sets=self.model_sets + model_sets,
        )


FULL = Budget(
    release_tokens=(2_500_000, 10_000_000, 40_000_000),
    eval_tokens=500_000,
    global_batch=64,
    eval_samples=2048,
    vocab_size=8192,
    procs=2,
)
QUICK = Budget(
    release_tokens=(8 * 16 * SEQ_LEN, 16 * 16 * SEQ_LEN),
    eval_tokens=4 * 16 * SEQ_LEN,
    global_batch=16,
    eval_samples=64,
    vocab_size=1024,
    procs=1,
    max_documents=400,
    model_sets=("model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"),
)


# ------------------------------------------------------------------------------------------------ data


def held_out(doc_id: str, fraction: float) -> bool:
    """A fixed share of the documents, whatever the file order: the first 8 bytes of sha1(id) as a fraction."""
    return int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:8], "big") / 2**64 < fraction


def read_documents(path: Path, text_field: str, id_field: str, limit: int | None) -> list[dict]:
    """The documents of one jsonl(.gz) corpus file; a missing, empty or field-less file is one line."""
    if not path.is_file():
        raise BenchError(f"--corpus {path}: file not found")
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise BenchError(f"--corpus {path}: line {number} is not JSON") from None
            missing = [f for f in (text_field, id_field) if f not in record]
            if missing:
                raise BenchError(
                    f"--corpus {path}: line {number} has no {missing[0]!r} field (it has {', '.join(sorted(record))}; "
                    "set --text-field / --id-field)"
                )
            docs.append({"id": str(record[id_field]), "text": record[text_field]})
            if limit and len(docs) >= limit:
                break
    if not docs:
        raise BenchError(f"--corpus {path}: no documents in the file")
    return docs


def _fingerprint(text: str) -> bytes:
    return hashlib.sha1(" ".join(text.split()).encode()).digest()


def write_jsonl(path: Path, docs: list[dict]) -> None:
    """Written whole or not at all: a temp file renamed into place."""
    temp = path.with_suffix(".tmp")
    with open(temp, "w", encoding="utf-8") as handle:
        for doc in docs:
            handle.write(json.dumps(doc, ensure_ascii=False) + "\n")
    os.replace(temp, path)


def split_corpus(files: list[Path], fraction: float, text_field: str, id_field: str, out: Path, limit: int | None):
    """train.jsonl and heldout.jsonl in out (reused when split.json says they are complete)."""
    summary_path = out / "split.json"
    if summary_path.is_file():
        return json.loads(summary_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    docs = [doc for path in files for doc in read_documents(path, text_field, id_field, limit)]
    ids = [d["id"] for d in docs]
    if len(set(ids)) != len(ids):
        raise BenchError(f"--corpus: {len(ids) - len(set(ids))} document ids occur twice; ids must be unique")
    train = [d for d in docs if not held_out(d["id"], fraction)]
    trained = {_fingerprint(d["text"]) for d in train}
    candidates = [d for d in docs if held_out(d["id"], fraction)]
    heldout = [d for d in candidates if _fingerprint(d["text"]) not in trained]
    if not heldout or not train:
        raise BenchError(f"--heldout-fraction {fraction}: leaves {len(heldout)} held-out, {len(train)} training docs")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    summary = {
        "files": [str(p) for p in files],
        "fraction": fraction,
        "documents": len(docs),
        "train_documents": len(train),
        "heldout_documents": len(heldout),
        "heldout_dropped_as_duplicates": len(candidates) - len(heldout),
    }
    summary_path.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def check_no_overlap(ood: Path, train_jsonl: Path) -> None:
    """Refuse out-of-domain text whose lines are training documents."""
    trained = set()
    with open(train_jsonl, encoding="utf-8") as handle:
        for line in handle:
            trained.add(_fingerprint(json.loads(line)["text"]))
    lines = [line for line in ood.read_text(encoding="utf-8").splitlines() if line.strip()]
    overlap = sum(_fingerprint(line) in trained for line in lines)
    if overlap:
        raise BenchError(f"--ood {ood}: {overlap} of its {len(lines)} lines are training documents; not held out")


def build_shards(inputs: list[Path], out_dir: Path, budget: Budget, tokenizer: Path | None = None) -> Path:
    from data_pipeline.build import build
    from data_pipeline.config import BuildConfig

    if not (out_dir / "manifest.json").is_file():
        config = BuildConfig(
            inputs=[str(p) for p in inputs],
            out_dir=str(out_dir),
            tokenizer=None if tokenizer is None else str(tokenizer),
            vocab_size=budget.vocab_size,
            seq_len=SEQ_LEN,
            validation_fraction=0.0,
            shard_mb=4.0,
        )
        build(config, workers=1, progress=False)
    return out_dir


# ------------------------------------------------------------------------------------- held-out reading


def heldout_batches(shards: Path, samples: int) -> list[dict]:
    """The first `samples` sequences with masks fixed by seed 0: the same inputs for every release."""
    from data_pipeline.shards import read_manifest
    from pretrain.data import Masking, validation_batches

    manifest = read_manifest(shards)
    masking = Masking(manifest["special_ids"], manifest["vocab_size"])
    return list(validation_batches(manifest, "train", masking, 0, 0, 1, 32, samples))


def read_heldout(release: Path, batches: list[dict]) -> dict:
    """Masked-LM loss and accuracy of a release over every masked token of the batches."""
    import torch

    from hypermixer import ForMaskedLM
    from hypermixer.heads import IGNORE_INDEX

    model = ForMaskedLM.from_pretrained(release).eval()
    loss_sum, correct, masked = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            out = model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"])
            targets = batch["labels"][batch["labels"] != IGNORE_INDEX]
            loss_sum += float(out.loss) * len(targets)
            correct += int((out.logits.argmax(dim=-1) == targets).sum())
            masked += len(targets)
    return {"loss": loss_sum / masked, "accuracy": correct / masked, "masked_tokens": masked}


# ---------------------------------------------------------------------------------------------- report


def tokens_label(tokens: int) -> str:
    return f"{tokens / 1e6:g}M" if tokens >= 100_000 else f"{tokens / 1e3:g}k"


def plot_wallclock(curves: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for curve in curves:
        ax.plot([s / 60 for s in curve["train_seconds"]], curve["loss"], label=curve["name"])
    ax.set_xlabel("training minutes (steps only; evaluations and checkpoints excluded)")
    ax.set_ylabel("held-out masked-LM loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def release_table(readings: dict[str, dict[str, dict]], sets: list[str]) -> list[str]:
    head = "| release | tokens | " + " | ".join(f"{s} loss | {s} accuracy" for s in sets) + " |"
    lines = [head, "|---|---:|" + "---:|---:|" * len(sets)]
    for name, reading in readings.items():
        cells = " | ".join(f"{reading[s]['loss']:.3f} | {100 * reading[s]['accuracy']:.1f}%" for s in sets)
        lines.append(f"| {name} | {reading['tokens'] / 1e6:.2f}M | {cells} |")
    return lines


# ------------------------------------------------------------------------------------------ downstream

SCALING_EXAMPLES = 2000  # labelled examples for the downstream-against-tokens curves
EFFICIENCY_EXAMPLES = (500, 2000, 8000, None)  # None: all (SST-2 capped at 20,000)
SST2_ALL = 20_000
IMDB_DEV = 2500  # reviews of imdb/train.jsonl.gz held out as its dev set, fixed by a hash of their id
QUICK_IMDB_DEV = 40
QUICK_JOBS = (("SST-2", "scratch"), ("imdb", "pretrained"))
GLUE_TASKS = ("CoLA", "MRPC", "RTE")  # at full size, from the last release


def epochs_for(examples: int | None) -> int:
    """About the same number of optimizer steps at every size, within 2-10 epochs."""
    return max(2, min(10, 20_000 // (examples or SST2_ALL)))


def downstream_recipes(examples: int | None, imdb: Path, dev_size: int = IMDB_DEV) -> list[TaskRecipe]:
    """SST-2 (GLUE) and IMDB (the labelled reviews, through finetune's support for a user's files)."""
    tag = f"n{examples or 'all'}"
    imdb_files = (
        *("--train-file", str(imdb), "--text-field", "text", "--label-field", "label", "--id-field", "id"),
        *("--dev-size", str(dev_size)),
    )
    sst2 = min(examples or SST2_ALL, SST2_ALL)
    return [
        TaskRecipe("SST-2", 1e-3, epochs_for(examples), 64, max_train_examples=sst2, tag=tag),
        TaskRecipe("imdb", 1e-3, epochs_for(examples), 128, max_train_examples=examples, files=imdb_files, tag=tag),
    ]


def downstream_jobs(
    releases: dict[str, dict[int, Path]], seeds: list[int], imdb: Path, dev_size: int = IMDB_DEV
) -> list[tuple]:
    """(release, recipe, init, seed), cheapest first: the scaling points, then the data-efficiency sizes
    from the last release, then CoLA, MRPC and RTE at full size from the last release. Scratch runs take
    the last release's config and tokenizer."""
    jobs: list[tuple] = []
    inits = ("scratch", "pretrained")
    for by_tokens in releases.values():
        last = by_tokens[max(by_tokens)]
        for recipe in downstream_recipes(SCALING_EXAMPLES, imdb, dev_size):
            jobs += [(last, recipe, "scratch", seed) for seed in seeds]
            jobs += [(release, recipe, "pretrained", seed) for release in by_tokens.values() for seed in seeds]
    for examples in [n for n in EFFICIENCY_EXAMPLES if n != SCALING_EXAMPLES]:
        for by_tokens in releases.values():
            last = by_tokens[max(by_tokens)]
            recipes = downstream_recipes(examples, imdb, dev_size)
            jobs += [(last, r, i, s) for r in recipes for i in inits for s in seeds]
    glue = [r for r in QUALITY_FULL.tasks if r.task in GLUE_TASKS]
    for by_tokens in releases.values():
        jobs += [(by_tokens[max(by_tokens)], r, i, s) for r in glue for i in inits for s in seeds]
    return jobs


def _cell(summary: dict, model: str, init: str, task: str) -> str:
    entry = summary.get(model, {}).get(init, {}).get(task)
    return "" if entry is None else f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f} ({len(entry['seeds'])})"


def scaling_table(summary: dict, releases: dict[str, dict[int, Path]]) -> list[str]:
    """Downstream score against pretraining tokens (scratch: 0 tokens)."""
    tasks = [r.name for r in downstream_recipes(SCALING_EXAMPLES, Path())]
    points = sorted({t for by_tokens in releases.values() for t in by_tokens})
    lines = [
        "| pretraining run | task | scratch | " + " | ".join(f"{t / 1e6:.2f}M" for t in points) + " |",
        "|---|---|" + "---:|" * (len(points) + 1),
    ]
    for run, by_tokens in releases.items():
        for task in tasks:
            cells = [_cell(summary, by_tokens[max(by_tokens)].name, "scratch", task)]
            cells += [_cell(summary, by_tokens[t].name, "pretrained", task) if t in by_tokens else "" for t in points]
            lines.append(f"| {run} | {task} | " + " | ".join(cells) + " |")
    return lines


def efficiency_table(summary: dict, releases: dict[str, dict[int, Path]]) -> list[str]:
    """Score by labelled examples, pretrained (the last release) against scratch, and the gain."""
    lines = ["| pretraining run | task | examples | scratch | pretrained | gain |", "|---|---|---:|---:|---:|---:|"]
    for run, by_tokens in releases.items():
        last = by_tokens[max(by_tokens)].name
        for examples in EFFICIENCY_EXAMPLES:
            for recipe in downstream_recipes(examples, Path()):
                entries = [summary.get(last, {}).get(init, {}).get(recipe.name) for init in ("scratch", "pretrained")]
                gain = f"{100 * (entries[1]['mean'] - entries[0]['mean']):+.1f}" if all(entries) else ""
                lines.append(
                    f"| {run} | {recipe.task} | {examples or 'all'} | {_cell(summary, last, 'scratch', recipe.name)} "
                    f"| {_cell(summary, last, 'pretrained', recipe.name)} | {gain} |"
                )
    return lines


def glue_table(summary: dict, releases: dict[str, dict[int, Path]]) -> list[str]:
    """CoLA, MRPC and RTE at full size (CoLA: bench.quality's 4,000 sentences), the last release against scratch."""
    lines = ["| pretraining run | task | scratch | pretrained | gain |", "|---|---|---:|---:|---:|"]
    for run, by_tokens in releases.items():
        last = by_tokens[max(by_tokens)].name
        for task in GLUE_TASKS:
            entries = [summary.get(last, {}).get(init, {}).get(task) for init in ("scratch", "pretrained")]
            gain = f"{100 * (entries[1]['mean'] - entries[0]['mean']):+.1f}" if all(entries) else ""
            lines.append(
                f"| {run} | {task} | {_cell(summary, last, 'scratch', task)} "
                f"| {_cell(summary, last, 'pretrained', task)} | {gain} |"
            )
    return lines


# ------------------------------------------------------------------------------------------------- main


def add_corpus_arguments(parser: argparse.ArgumentParser) -> None:
    """The corpus and held-out flags, shared with bench.recipe_sweep (which reads the same data folder)."""
    parser.add_argument(
        "--corpus", type=Path, action="append", default=None, help="jsonl(.gz) corpus file, repeatable (default: IMDB)"
    )
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--id-field", default="id", help="the held-out split hashes this field")
    parser.add_argument("--heldout-fraction", type=float, default=0.01)
    parser.add_argument(
        "--ood", type=Path, default=DEFAULT_OOD, help="out-of-domain held-out text (default: WikiText-2 test)"
    )


def check_corpus_arguments(args: argparse.Namespace) -> None:
    args.corpus = args.corpus or list(DEFAULT_CORPUS)
    if not args.ood.is_file():
        raise BenchError(f"--ood {args.ood}: file not found")
    if not 0 < args.heldout_fraction < 0.5:
        raise BenchError(f"--heldout-fraction {args.heldout_fraction}: expected a fraction in (0, 0.5)")


@dataclass(frozen=True)
class CorpusData:
    split: dict  # split_corpus's summary
    train: Path  # shards (and the tokenizer every other build uses)
    heldout: Path
    ood: Path
    train_tokens: int


def prepare_data(args: argparse.Namespace, budget: Budget, out: Path) -> CorpusData:
    """Step 1: the split and the three shard builds in out/data, each reused when complete."""
    split = split_corpus(
        args.corpus, args.heldout_fraction, args.text_field, args.id_field, out / "data" / "docs", budget.max_documents
    )
    docs = out / "data" / "docs"
    check_no_overlap(args.ood, docs / "train.jsonl")
    train = build_shards([docs / "train.jsonl"], out / "data" / "train", budget)
    tokenizer = train / "tokenizer.json"
    heldout = build_shards([docs / "heldout.jsonl"], out / "data" / "heldout", budget, tokenizer)
    ood = build_shards([args.ood], out / "data" / "ood", budget, tokenizer)
    check_releases_share_tokenizer(out / "releases", tokenizer)
    train_tokens = json.loads((train / "manifest.json").read_text())["splits"]["train"]["tokens"]
    log(
        f"data: {split['train_documents']:,} training documents ({train_tokens:,} tokens), "
        f"{split['heldout_documents']:,} held out ({split['heldout_dropped_as_duplicates']} duplicates dropped)"
    )
    return CorpusData(split, train, heldout, ood, train_tokens)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.corpus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every stage at toy size (a couple of minutes)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT})")
    add_corpus_arguments(parser)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {','.join(MODELS)}")
    parser.add_argument("--seeds", default="0", help="pretraining seeds, comma-separated")
    parser.add_argument("--finetune-seeds", default="0,1,2", help="fine-tuning seeds, comma-separated")
    parser.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help="GLUE folder with SST-2, CoLA, MRPC, RTE")
    parser.add_argument(
        "--imdb",
        type=Path,
        default=IMDB / "train.jsonl.gz",
        help="labelled reviews for the IMDB task (jsonl: text, label, id)",
    )
    parser.add_argument("--no-finetune", action="store_true", help="stop after pretraining and the held-out readings")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: write the results of what the runs hold so far (also while they run)",
    )
    parser.add_argument(
        "--set", dest="sets", nargs="+", default=[], metavar="KEY=VALUE", help="recipe settings for every run"
    )
    args = parser.parse_args(argv)
    check_corpus_arguments(args)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise BenchError(f"--models: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.finetune_seeds = [int(s) for s in args.finetune_seeds.split(",") if s.strip()]
    if not args.no_finetune:
        for flag, path in (("--glue-dir", args.glue_dir), ("--imdb", args.imdb)):
            if not path.exists():
                raise BenchError(f"{flag} {path}: not found (or pass --no-finetune)")
    return args


def check_releases_share_tokenizer(releases: Path, tokenizer: Path) -> None:
    """Releases kept in --out from an earlier run must have the tokenizer the data was just rebuilt with, or
    the models compared downstream would not read the same pieces."""
    digest = sha256_file(tokenizer)
    for kept in sorted(releases.glob("*/tokenizer.json")):
        if sha256_file(kept) != digest:
            raise BenchError(
                f"{kept}: differs from the rebuilt {tokenizer}; the corpus or the build changed since this "
                "release was made: use a new --out"
            )


def run_key(run: dict) -> tuple:
    return run["model"], run["init"], run["task"], run["seed"]


def job_key(job: tuple) -> tuple:
    release, recipe, init, seed = job
    return release.name, init, recipe.name, seed


def read_recorded(path: Path, budget: dict, tokenizer_digest: str) -> dict:
    """What an earlier run of this --out measured, from its results.json. Its work files (checkpoints, releases,
    fine-tuning folders) are not kept by git, so on a fresh clone the committed results.json is what a rerun
    continues from: recorded fine-tuning runs are not run again, recorded curves and readings stay."""
    empty: dict = {"pretraining": {}, "releases": {}, "finetune_runs": []}
    if not path.is_file():
        return empty
    report = json.loads(path.read_text())
    if report["budget"] != json.loads(json.dumps(budget)):
        raise BenchError(f"{path}: written with another budget ({report['budget']}); use a new --out")
    if report.get("tokenizer_sha256", tokenizer_digest) != tokenizer_digest:
        raise BenchError(f"{path}: its runs read another tokenizer than the one just built; use a new --out")
    return {key: report.get(key, value) for key, value in empty.items()}


def compare_rerun(name: str, earlier: dict, rerun: dict) -> dict:
    """A recorded run pretrained again (its releases were gone): how far its held-out curve is from the record,
    since fine-tuning runs from both are reported side by side."""
    recorded = dict(zip(earlier["tokens"], earlier["loss"]))
    gaps = [abs(loss - recorded[tokens]) for tokens, loss in zip(rerun["tokens"], rerun["loss"]) if tokens in recorded]
    found = {"evaluations": len(gaps), "max_loss_difference": max(gaps, default=None)}
    log(f"{name}: pretrained again; held-out loss against the recorded run: {found}")
    return found


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RuntimeError as err:  # a stage failed: its command and the tail of its log
        print(f"bench.corpus: {err}", file=sys.stderr)
        return 1


def run(argv: list[str] | None = None) -> int:
    from pretrain.metrics import read_metrics

    args = parse_args(argv)
    budget = QUICK if args.quick else FULL
    out = (args.out or (ROOT / "runs" / "bench" / "corpus-quick" if args.quick else DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    data = prepare_data(args, budget, out)
    split, train, heldout, ood, train_tokens = data.split, data.train, data.heldout, data.ood, data.train_tokens

    # Every release point a whole multiple of the first, so that one checkpoint interval lands on all of them.
    first = budget.steps(budget.release_tokens[0])
    release_steps = [first * round(t / budget.release_tokens[0]) for t in budget.release_tokens]
    steps = release_steps[-1]
    eval_every = budget.steps(budget.eval_tokens)
    size = budget.pretraining_size(steps, eval_every, model_sets=tuple(args.sets))
    # A checkpoint at every release point, all kept until exported.
    checkpoint_sets = (f"checkpoint.every_steps={first}", f"checkpoint.keep_last={steps // first + 1}")
    heldout_sets = {
        "in-domain": heldout_batches(heldout, budget.eval_samples),
        "ood": heldout_batches(ood, budget.eval_samples),
    }

    budget_record = {**budget.__dict__, "steps": steps, "release_steps": release_steps, "eval_every_steps": eval_every}
    tokenizer_digest = sha256_file(train / "tokenizer.json")
    recorded = read_recorded(out / "results.json", budget_record, tokenizer_digest)
    recorded_runs = {run_key(r): r for r in recorded["finetune_runs"]}

    def read_releases(name: str, curve: dict) -> dict[str, dict]:
        """Export the run's release points reached so far and read them on the held-out sets (cached)."""
        found = {}
        for step, tokens in zip(release_steps, budget.release_tokens):
            release_name = f"{name}-{tokens_label(tokens)}"  # named by its nominal budget; tokens are exact
            cached = out / "releases" / release_name / "heldout.json"
            export_from = Path(curve["run_dir"]) / "checkpoints" / f"step_{step:08d}"
            if not cached.is_file() and not export_from.is_dir() and release_name in recorded["releases"]:
                found[release_name] = recorded["releases"][release_name]  # read before; its files are gone
                continue
            if not cached.is_file() and not curve["done"] and not export_from.is_dir():
                continue  # not reached yet
            if not cached.is_file():
                release = export(release_name, out, export_from)
                reading = {key: read_heldout(release, batches) for key, batches in heldout_sets.items()}
                cached.write_text(json.dumps({**reading, "tokens": step * budget.global_batch * SEQ_LEN}) + "\n")
            found[release_name] = json.loads(cached.read_text())
        return found

    # Every run's releases, planned: the fine-tuning jobs are known before any pretraining starts.
    names = [(seed, model, f"{model}-s{seed}") for seed in args.seeds for model in args.models]
    planned_releases = {
        name: {
            step * budget.global_batch * SEQ_LEN: out / "releases" / f"{name}-{tokens_label(tokens)}"
            for step, tokens in zip(release_steps, budget.release_tokens)
        }
        for _, model, name in names
        if model != "bert-hf"
    }
    jobs = (
        []
        if args.no_finetune
        else downstream_jobs(
            planned_releases, args.finetune_seeds, args.imdb, QUICK_IMDB_DEV if args.quick else IMDB_DEV
        )
    )
    if args.quick and jobs:  # the code path, not the curves: a small SST-2 and IMDB run, from scratch and pretrained
        picked = [next(j for j in jobs if j[1].task == task and j[2] == init) for task, init in QUICK_JOBS]
        jobs = [(release, replace(recipe, max_train_examples=64, epochs=1), *rest) for release, recipe, *rest in picked]
    # A finished run is pretrained again only when a fine-tuning run still to do needs a release it no longer has.
    needs_releases = {
        job[0].name.rsplit("-", 1)[0]
        for job in jobs
        if job_key(job) not in recorded_runs
        and not (finetune_dir(*job, out) / "result.json").is_file()
        and not (job[0] / "model.safetensors").is_file()
    }

    curves: dict[str, dict] = {}
    readings: dict[str, dict] = {}
    for seed, model, name in names:
        mixer, variant_sets = VARIANTS.get(model, (model, ()))
        earlier = recorded["pretraining"].get(name)
        if args.report_only:  # what the runs have written so far, e.g. while they run
            on_disk = None
            if any(r["kind"] == "eval" for r in read_metrics(out / "pretrain" / name)):
                on_disk = read_curve(name, mixer, out / "pretrain" / name, steps)
            found = [c for c in (on_disk, earlier) if c]
            if not found:
                continue
            curves[name] = max(found, key=lambda c: (c["done"], len(c["tokens"])))  # the one further along
            if on_disk is not None and curves[name] is on_disk:  # its run folder: written in this session, as a rule
                on_disk["machine"] = machine()
            if on_disk is not None and curves[name] is on_disk and earlier:
                if "rerun" in earlier:
                    on_disk["rerun"] = earlier["rerun"]
                elif on_disk["loss"][: len(earlier["loss"])] != earlier["loss"][: len(on_disk["loss"])]:
                    on_disk["rerun"] = compare_rerun(name, earlier, on_disk)
        elif earlier and earlier["done"] and name not in needs_releases:
            curves[name] = earlier
        else:
            sets = (*checkpoint_sets, f"seed={seed}", *variant_sets)
            curves[name] = pretrain(name, mixer, size, train, heldout, out, steps, extra_sets=sets)
            curves[name]["machine"] = machine()  # of the session that ran it last (minutes compare on one)
            if earlier:
                curves[name]["rerun"] = compare_rerun(name, earlier, curves[name])
        # Exported as soon as the run ends, not after every run: its checkpoints need not outlive it.
        if model != "bert-hf":
            readings.update(read_releases(name, curves[name]))
    # A release made again that reads differently on the held-out text is another model (a rerun of the same
    # seed drifts from the record once it leaves the plateau): what was fine-tuned from the recorded one is
    # fine-tuned again from it, so that every number of a release comes from one model.
    remade = {
        name
        for name, reading in readings.items()
        if name in recorded["releases"]
        and abs(reading["in-domain"]["loss"] - recorded["releases"][name]["in-domain"]["loss"]) > 1e-3
    }
    if remade:
        log(f"made again, and not the recorded model: {', '.join(sorted(remade))}; its pretrained runs are repeated")
        recorded_runs = {
            key: r for key, r in recorded_runs.items() if not (key[0] in remade and key[1] == "pretrained")
        }
    todo = [job for job in jobs if job_key(job) not in recorded_runs]
    if args.report_only:  # the runs finished so far, read and not run
        todo = [job for job in todo if (finetune_dir(*job, out) / "result.json").is_file()]
    # Runs from pretrained weights first: a release made again in this session may not be made bit for bit
    # alike in the next, while a scratch run needs only its config and tokenizer.
    todo.sort(key=lambda job: job[2] != "pretrained")
    # What this --out recorded for runs not asked for this time stays in the report.
    for name, curve in recorded["pretraining"].items():
        curves.setdefault(name, curve)
    for release_name, reading in recorded["releases"].items():
        readings.setdefault(release_name, reading)

    if todo and not args.report_only:
        log(f"fine-tuning: {len(todo)} runs, two at a time ({len(jobs) - len(todo)} recorded)")
    with ThreadPoolExecutor(max_workers=2) as pool:  # one thread each: two processes fill the 2 cores
        fresh = {
            job_key(job): r for job, r in zip(todo, pool.map(lambda job: finetune(*job, args.glue_dir, out), todo))
        }
    finished = {**recorded_runs, **fresh}
    runs: list[dict] = [finished[job_key(job)] for job in jobs if job_key(job) in finished]
    carried = [r for key, r in recorded_runs.items() if key not in {job_key(job) for job in jobs}]
    runs += carried
    planned = len(jobs) + len(carried)
    summary = summarize(runs) if runs else {}

    plot_curves(
        list(curves.values()),
        out / "pretraining.png",
        f"held-out masked-LM, {tokens_label(steps * budget.global_batch * SEQ_LEN)} tokens",
    )
    plot_wallclock(list(curves.values()), out / "wallclock.png")
    report = {
        "command": "python -m bench.corpus " + shlex.join(sys.argv[1:] if argv is None else argv),
        "recipe": "pretrain/configs/cpu.json",
        "budget": budget_record,
        "split": split,
        "train_tokens": train_tokens,
        "tokenizer_sha256": tokenizer_digest,
        "cpu_count": os.cpu_count(),
        "minutes_total": (time.monotonic() - began) / 60,
        "partial": not all(c["done"] for c in curves.values()) or any(name not in curves for *_, name in names),
        "pretraining": curves,
        "releases": readings,
        "finetune_runs": runs,
        "finetune_planned": planned,
        "downstream": summary,
    }
    temp = out / "results.json.tmp"
    temp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(temp, out / "results.json")
    lines = ["# bench.corpus", "", f"`{report['command']}`", "", *tables(report)]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]))
    return 0


def tables(report: dict) -> list[str]:
    """results.md's body from results.json (bench.report renders it too)."""
    split, curves, readings, summary = report["split"], report["pretraining"], report["releases"], report["downstream"]
    releases: dict[str, dict[int, Path]] = {}  # pretraining run -> tokens -> release (by name)
    for release_name, reading in readings.items():
        releases.setdefault(release_name.rsplit("-", 1)[0], {})[reading["tokens"]] = Path(release_name)
    sets = [key for key in next(iter(readings.values()), {}) if key != "tokens"]
    lines = [
        f"{split['train_documents']:,} training documents ({report['train_tokens']:,} tokens); "
        f"{split['heldout_documents']:,} held out by a hash of their id"
        f"{' (partial: runs still to finish)' if report['partial'] else ''}.",
        "",
        "Pretraining (held-out documents, last evaluation so far):",
        "",
        *pretraining_table(list(curves.values())),
    ]
    if readings:
        lines += [
            "",
            "Releases on held-out text (in-domain: the held-out documents; ood: the out-of-domain text):",
            "",
            *release_table(readings, sets),
        ]
    if summary:
        finished, planned = len(report["finetune_runs"]), report.get("finetune_planned", 0)
        lines += [
            "",
            *([f"{finished} of {planned} fine-tuning runs finished so far.", ""] if finished < planned else []),
            f"Downstream against pretraining tokens ({SCALING_EXAMPLES:,} labelled examples; dev x100, mean ± std "
            "over fine-tuning seeds, their number in brackets):",
            "",
            *scaling_table(summary, releases),
            "",
            "Data efficiency (the last release against the same model from random weights):",
            "",
            *efficiency_table(summary, releases),
            "",
            "CoLA, MRPC and RTE (the last release against scratch; dev x100: CoLA Matthews correlation, MRPC the "
            "mean of accuracy and F1, RTE accuracy):",
            "",
            *glue_table(summary, releases),
        ]
    return lines


if __name__ == "__main__":
    sys.exit(main())
