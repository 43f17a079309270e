"""Does pretraining pay off? Three masked-LM models at an equal token budget, then GLUE fine-tuning of
each of ours from its pretrained weights and from random weights.

    python -m bench.quality                 # the full run (about 1.5 h on 2 cores): writes bench/results/quality/
    python -m bench.quality --quick         # every stage at toy size, a couple of minutes (the test runs it)

1. data: `data_pipeline build` of the corpus (a WordPiece tokenizer trained on it, 128-token sequences)
   and of the held-out text with the same tokenizer; the held-out text is never trained on.
2. pretraining through the project's own trainer (`pretrain/main.py`, DeepSpeed) with the shipped
   `cpu` recipe: `hypermixer`, `transformer`, and Hugging Face's `BertForMaskedLM` of the same width,
   depth, heads, FFN size, vocabulary and sequence length (`bench/reference_bert.py`): same shards,
   same masks and labels, same optimizer and schedule; its forward and loss are its own. Held-out MLM
   loss/accuracy against tokens seen and against training time. `--models` also takes `transformer-post`
   and `hypermixer-post`: our mixers in BERT's post-LN block layout (`model.norm_position=post`).
3. ablation: the two mixers without the embedding LayerNorm (`model.embedding_layer_norm=false`, the
   encoder as it was before this benchmark found the transformer stuck on the unigram plateau), same
   budget; and a sweep of the mixers at other peak learning rates (`--sweep-lrs`) and other global batches
   at the same tokens (`--sweep-batches`). `--set KEY=VALUE` adds recipe settings to every pretraining run
   (e.g. `model.dropout=0.1`).
4. fine-tuning with `python -m finetune train` on SST-2, CoLA, MRPC and RTE, pretrained and scratch,
   `--seeds` each; mean and std per task beside the majority-class score.

Writes results.md, results.json and PNGs into --out and prints the tables. Stages whose output is
already complete in --out are reused (delete the folder to redo them).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
DEFAULT_CORPUS = ROOT / "demo" / "data" / "corpus" / "wikitext-2-valid.txt"  # = WikiText-2 valid.txt
DEFAULT_HELDOUT = SHARED / "corpus" / "wikitext-2" / "test.txt"
DEFAULT_GLUE = SHARED / "glue"
DEFAULT_OUT = ROOT / "bench" / "results" / "quality"
DEFAULT_MODELS = ("hypermixer", "transformer", "bert-hf")  # bert-hf: the independent reference
OURS = ("hypermixer", "transformer")
# Variants of our models: mixer and settings on top of the recipe. `-post`: post-LN blocks and no final
# LayerNorm, BERT's layout; transformer-post is the reference's computation in our code (a test checks it).
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {f"{m}-post": (m, ("model.norm_position=post",)) for m in OURS}
MODELS = DEFAULT_MODELS + tuple(VARIANTS)
RECIPE = "cpu"  # pretrain/configs/cpu.json
WARMUP_FRACTION = 0.0625  # the recipe's 50 of 800 steps, kept for other step counts


@dataclass(frozen=True)
class TaskRecipe:
    """Fine-tuning settings for one task (the same for pretrained and scratch): a GLUE task, or with `files`
    a task from the user's files (finetune's --train-file ... flags, in place of --task and --glue-dir)."""

    task: str
    lr: float
    epochs: int
    max_seq_len: int
    max_train_examples: int | None = None
    batch_size: int = 32
    files: tuple[str, ...] = ()
    tag: str = ""  # added to the run folder's name, to tell recipes of one task apart

    @property
    def name(self) -> str:
        return f"{self.task}-{self.tag}" if self.tag else self.task


@dataclass(frozen=True)
class Size:
    steps: int  # pretraining optimizer steps (x global batch x 128 tokens), the same for every model
    global_batch: int
    eval_every: int
    eval_samples: int  # held-out sequences per evaluation
    vocab_size: int
    procs: int  # pretraining processes (torchrun when > 1)
    tasks: tuple[TaskRecipe, ...]
    seeds: tuple[int, ...]
    sweep_lrs: tuple[float, ...]
    sweep_steps: int
    model_sets: tuple[str, ...] = field(default=())  # extra --set for the model (quick: smaller)


FULL = Size(
    steps=800,
    global_batch=64,
    eval_every=100,
    eval_samples=1024,
    vocab_size=8192,
    procs=2,
    tasks=(
        TaskRecipe("SST-2", 1e-3, 1, 64, max_train_examples=20_000),
        TaskRecipe("CoLA", 1e-3, 2, 64, max_train_examples=4_000),
        TaskRecipe("MRPC", 5e-4, 2, 128),
        TaskRecipe("RTE", 5e-4, 2, 128),
    ),
    seeds=(0, 1, 2),
    sweep_lrs=(1e-3, 4e-3),
    sweep_steps=300,
)
QUICK = Size(
    steps=12,
    global_batch=16,
    eval_every=6,
    eval_samples=64,
    vocab_size=1024,
    procs=1,
    tasks=(
        TaskRecipe("SST-2", 3e-3, 1, 32, max_train_examples=128),
        TaskRecipe("MRPC", 3e-3, 1, 64, max_train_examples=64),
    ),
    seeds=(0, 1),
    sweep_lrs=(4e-3,),
    sweep_steps=6,
    model_sets=("model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"),
)


class BenchError(SystemExit):
    """One line on stderr, exit code 2."""

    def __init__(self, message: str) -> None:
        print(f"bench.quality: {message}", file=sys.stderr)
        super().__init__(2)


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------- stages


def environment() -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return env


def run_command(command: list[str], log_file: Path, threads: int = 1, append: bool = False) -> None:
    """Run one stage command; its output goes to log_file; a failure names the command and the log."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "OMP_NUM_THREADS": str(threads)}
    with open(log_file, "a" if append else "w") as handle:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}); log {log_file}:\n" + "\n".join(tail))


def build_data(corpus: list[Path], heldout: Path, out: Path, size: Size) -> tuple[Path, Path]:
    """Shards of the corpus (all in the train split) and of the held-out text, one tokenizer."""
    from data_pipeline.build import build
    from data_pipeline.config import BuildConfig

    train, held = out / "data" / "train", out / "data" / "heldout"
    common = dict(vocab_size=size.vocab_size, seq_len=128, validation_fraction=0.0, shard_mb=1.0)
    if not (train / "manifest.json").is_file():
        build(BuildConfig(inputs=[str(p) for p in corpus], out_dir=str(train), **common), workers=1, progress=False)
    if not (held / "manifest.json").is_file():
        build(
            BuildConfig(inputs=[str(heldout)], out_dir=str(held), tokenizer=str(train / "tokenizer.json"), **common),
            workers=1,
            progress=False,
        )
    return train, held


def pretrain_sets(
    size: Size, data: Path, heldout: Path, run_dir: Path, mixer: str, steps: int, lr: float | None
) -> list[str]:
    sets = [
        f"data.path={data}",
        f"data.validation_path={heldout}",
        "data.validation_split=train",
        f"model.mixer={'transformer' if mixer == 'bert-hf' else mixer}",
        f"optim.total_steps={steps}",
        f"optim.warmup_steps={max(1, round(WARMUP_FRACTION * steps))}",
        f"batch.global_batch_size={size.global_batch}",
        f"batch.micro_batch_size={size.global_batch // size.procs}",
        f"eval.every_steps={size.eval_every}",
        f"eval.max_samples={size.eval_samples}",
        f"checkpoint.every_steps={steps}",
        "logging.wandb.mode=disabled",
        f"output_dir={run_dir}",
        *size.model_sets,
    ]
    if lr is not None:
        sets.append(f"optim.lr={lr}")
    return sets


def pretrain(
    name: str,
    mixer: str,
    size: Size,
    data: Path,
    heldout: Path,
    out: Path,
    steps: int,
    lr: float | None = None,
    extra_sets: tuple[str, ...] = (),
) -> dict:
    """One pretraining run (reused when its run_status says completed); returns its curve."""
    run_dir = out / "pretrain" / name
    status = run_dir / "run_status.json"
    if not (status.is_file() and json.loads(status.read_text()).get("status") == "completed"):
        # An interrupted run continues from its newest checkpoint (--resume auto); one without any starts over.
        resume = any((run_dir / "checkpoints").glob("step_*"))
        if not resume:
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        script = ["--module", "bench.reference_bert"] if mixer == "bert-hf" else [str(ROOT / "pretrain" / "main.py")]
        # torchrun even for one process: --standalone finds its own free port (no race between runs)
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={size.procs}",
            *script,
        ]
        command = [
            *launcher,
            "--config",
            RECIPE,
            "--set",
            *pretrain_sets(size, data, heldout, run_dir, mixer, steps, lr),
            *extra_sets,
            *(["--resume", "auto"] if resume else []),
        ]
        log(f"pretraining {name}: {steps} steps{' (resumed)' if resume else ''} ({'$ ' + ' '.join(command)})")
        began = time.monotonic()
        run_command(command, out / "logs" / f"pretrain-{name}.log", threads=2 // size.procs or 1, append=resume)
        log(f"  done in {(time.monotonic() - began) / 60:.1f} min")
    return read_curve(name, mixer, run_dir, steps, lr)


def machine() -> str:
    """The CPU that minutes and tokens/s were measured on: runs resumed in another session may land on
    another machine, and the model name alone does not tell the vector units apart."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    units = [unit for unit in ("avx2", "avx512f", "amx_tile") if unit in flags]
    return f"{model} ({', '.join(units) or 'no avx2'}), {os.cpu_count()} CPUs"


def read_curve(name: str, mixer: str, run_dir: Path, steps: int, lr: float | None = None) -> dict:
    """A pretraining run's held-out curve from its metrics, so far: `done` says whether it reached `steps`."""
    from pretrain.metrics import read_metrics

    records = read_metrics(run_dir)
    evals = [r for r in records if r["kind"] == "eval"]
    trains = [r for r in records if r["kind"] == "train"]
    windows = trains[1:] or trains  # the first window includes start-up
    return {
        "name": name,
        "mixer": mixer,
        "lr": lr,
        "steps": steps,
        "run_dir": str(run_dir),
        "parameters": _parameters(run_dir),
        "tokens": [r["tokens"] for r in evals],
        "train_seconds": [r["train_seconds"] for r in evals],
        "loss": [r["loss"] for r in evals],
        "accuracy": [r["accuracy"] for r in evals],
        "masked_tokens": evals[-1]["masked_tokens"],
        "tokens_per_s": len(windows) / sum(1.0 / r["tokens_per_s"] for r in windows),
        "minutes": evals[-1]["train_seconds"] / 60,
        "done": evals[-1]["step"] >= steps,
    }


def _parameters(run_dir: Path) -> int | None:
    for line in (run_dir.parent.parent / "logs").glob(f"pretrain-{run_dir.name}.log"):
        for text in line.read_text().splitlines():
            if " parameters, " in text and text.startswith("run "):
                return int(text.split(", ")[1].split()[0].replace(",", ""))
    return None


def export(name: str, out: Path, checkpoint: Path | None = None) -> Path:
    """The release of a run's newest checkpoint, or of `checkpoint` (a kept step folder)."""
    release = out / "releases" / name
    if not (release / "model.safetensors").is_file():
        source = checkpoint or out / "pretrain" / name
        if not source.is_dir():
            raise RuntimeError(f"checkpoint {source} not found: its run did not keep it")
        run_command(
            [sys.executable, "-m", "pretrain.export", str(source), str(release)], out / "logs" / f"export-{name}.log"
        )
    return release


def finetune_dir(release: Path, recipe: TaskRecipe, init: str, seed: int, out: Path) -> Path:
    """One fine-tuning run's folder; its result.json is written last, when the run has finished."""
    return out / "finetune" / f"{release.name}-{init}-{recipe.name}-s{seed}"


def finetune(release: Path, recipe: TaskRecipe, init: str, seed: int, glue: Path, out: Path) -> dict:
    run_dir = finetune_dir(release, recipe, init, seed, out)
    result = run_dir / "result.json"
    if not result.is_file():
        command = [
            sys.executable,
            "-m",
            "finetune",
            "train",
            "--release",
            str(release),
            *(recipe.files or ("--task", recipe.task, "--glue-dir", str(glue))),
            "--output-dir",
            str(run_dir),
            "--lr",
            str(recipe.lr),
            "--batch-size",
            str(recipe.batch_size),
            "--seed",
            str(seed),
            "--epochs",
            str(recipe.epochs),
            "--max-seq-len",
            str(recipe.max_seq_len),
            "--device",
            "cpu",
            "--no-save-model",
            "--no-predict",
            "--no-progress",
        ]
        if recipe.max_train_examples:
            command += ["--max-train-examples", str(recipe.max_train_examples)]
        if init == "scratch":
            command.append("--from-scratch")
        run_command(command, out / "logs" / f"finetune-{run_dir.name}.log")
    data = json.loads(result.read_text())
    return {
        "model": release.name,
        "init": init,
        "task": recipe.name,
        "seed": seed,
        "score": data["score"],
        "dev": data["dev"][recipe.task] if recipe.task in data["dev"] else next(iter(data["dev"].values())),
        "best_epoch": data["best_epoch"],
        "seconds": data["seconds"],
    }


def majority_scores(glue: Path, tasks: tuple[TaskRecipe, ...]) -> dict[str, dict[str, float]]:
    """Each task's metrics when every dev example gets the most frequent training label."""
    from collections import Counter

    from finetune import metrics
    from finetune.data import read_split
    from finetune.tasks import get_task

    scores = {}
    for recipe in tasks:
        task = get_task(recipe.task)
        common = Counter(read_split(task, task.train, glue_dir=str(glue)).labels).most_common(1)[0][0]
        dev = read_split(task, task.evals[0].dev, glue_dir=str(glue)).labels
        values = metrics.compute(task.metrics, dev, [common] * len(dev))
        scores[recipe.task] = {**values, "score": metrics.task_score({recipe.task: values})}
    return scores


# ---------------------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict:
    """(model, init, task) -> mean/std of the task score and of each metric over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["model"], r["init"], r["task"]), []).append(r)
    table = {}
    for (model, init, task), rows in sorted(groups.items()):
        entry = {"seeds": [r["seed"] for r in rows], "scores": [r["score"] for r in rows]}
        entry["mean"] = statistics.fmean(entry["scores"])
        entry["std"] = statistics.stdev(entry["scores"]) if len(rows) > 1 else 0.0
        for metric in rows[0]["dev"]:
            entry[metric] = statistics.fmean(r["dev"][metric] for r in rows)
        table.setdefault(model, {}).setdefault(init, {})[task] = entry
    return table


def plot_curves(curves: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for index, c in enumerate(curves):
        style = {"color": f"C{index}", "marker": ".", "label": c["name"]}
        axes[0][0].plot([t / 1e6 for t in c["tokens"]], c["loss"], **style)
        axes[0][1].plot([t / 1e6 for t in c["tokens"]], [100 * a for a in c["accuracy"]], **style)
        axes[1][0].plot([s / 60 for s in c["train_seconds"]], c["loss"], **style)
        axes[1][1].plot([s / 60 for s in c["train_seconds"]], [100 * a for a in c["accuracy"]], **style)
    for row, xlabel in ((0, "training tokens (millions)"), (1, "training time (minutes, 2 cores)")):
        axes[row][0].set(xlabel=xlabel, ylabel="held-out MLM loss (nats)")
        axes[row][1].set(xlabel=xlabel, ylabel="held-out MLM accuracy (%)")
    for axis in axes.flat:
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_downstream(summary: dict, majority: dict, tasks: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.4), squeeze=False)
    for axis, task in zip(axes[0], tasks):
        labels, means, stds, colors = [], [], [], []
        for model in summary:
            for index, init in enumerate(("scratch", "pretrained")):
                entry = summary[model].get(init, {}).get(task)
                if entry:
                    labels.append(f"{model}\n{init}")
                    means.append(100 * entry["mean"])
                    stds.append(100 * entry["std"])
                    colors.append(f"C{index}")
        axis.bar(range(len(means)), means, yerr=stds, color=colors, capsize=3)
        axis.axhline(100 * majority[task]["score"], color="gray", linestyle="--", label="majority class")
        axis.set_xticks(range(len(labels)), labels, fontsize=6)
        axis.set_title(task)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def pretraining_table(curves: list[dict]) -> list[str]:
    lines = [
        "| model | parameters | peak lr | steps | tokens | held-out MLM loss | held-out MLM accuracy | "
        "best loss (at) | tokens/s | minutes |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in curves:
        best = min(range(len(c["loss"])), key=c["loss"].__getitem__)
        lines.append(
            f"| {c['name']} | {c['parameters'] or 0:,} | {c['lr'] or 'recipe'} | {c['steps']} | {c['tokens'][-1]:,} | "
            f"{c['loss'][-1]:.3f} | {100 * c['accuracy'][-1]:.1f}% | {c['loss'][best]:.3f} "
            f"({c['tokens'][best] / 1e6:.1f}M tokens) | "
            f"{c['tokens_per_s']:,.0f} | {c['minutes']:.1f} |"
        )
    return lines


def reference_gap(curves: dict[str, dict], ours: str = "transformer") -> list[dict]:
    """Our transformer's (or a variant's) held-out loss relative to the HF BERT's at each evaluation."""
    mine, ref = curves.get(ours), curves.get("bert-hf")
    if not mine or not ref:
        return []
    return [
        {"tokens": t, ours.replace("-", "_"): a, "bert_hf": b, "relative": a / b - 1.0}
        for t, a, b in zip(mine["tokens"], mine["loss"], ref["loss"])
    ]


def downstream_table(summary: dict, majority: dict, tasks: list[str]) -> list[str]:
    head = "| model | init | " + " | ".join(tasks) + " | average |"
    lines = [head, "|---|---|" + "---:|" * (len(tasks) + 1)]
    lines.append(
        "| majority class | - | "
        + " | ".join(f"{100 * majority[t]['score']:.1f}" for t in tasks)
        + f" | {100 * statistics.fmean(majority[t]['score'] for t in tasks):.1f} |"
    )
    for model in summary:
        for init in ("scratch", "pretrained"):
            entries = summary[model].get(init, {})
            if not entries:
                continue
            cells = [
                f"{100 * entries[t]['mean']:.1f} ± {100 * entries[t]['std']:.1f}" if t in entries else "-"
                for t in tasks
            ]
            average = statistics.fmean(100 * entries[t]["mean"] for t in tasks if t in entries)
            lines.append(f"| {model} | {init} | " + " | ".join(cells) + f" | {average:.1f} |")
        if "scratch" in summary[model] and "pretrained" in summary[model]:
            gains = [
                100 * (summary[model]["pretrained"][t]["mean"] - summary[model]["scratch"][t]["mean"])
                for t in tasks
                if t in summary[model]["pretrained"] and t in summary[model]["scratch"]
            ]
            lines.append(
                f"| {model} | gain | " + " | ".join(f"{g:+.1f}" for g in gains) + f" | {statistics.fmean(gains):+.1f} |"
            )
    return lines


# ---------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="every stage at toy size (a couple of minutes)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"results folder (default: {DEFAULT_OUT}, or runs/bench/quality-quick with --quick)",
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        action="append",
        default=None,
        help=f"pretraining text (repeat for several files; default: {DEFAULT_CORPUS.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--heldout",
        type=Path,
        default=DEFAULT_HELDOUT,
        help="held-out text for MLM loss/accuracy, never trained on (default: ../shared WikiText-2 test.txt)",
    )
    parser.add_argument("--glue-dir", type=Path, default=DEFAULT_GLUE, help="GLUE folder with SST-2, CoLA, MRPC, RTE")
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps per model (default: 800)")
    parser.add_argument("--seeds", default=None, help="fine-tuning seeds, comma-separated (default: 0,1,2)")
    parser.add_argument(
        "--sweep-lrs",
        default=None,
        help="extra peak learning rates for the mixers' sweep, comma-separated; '' skips the sweep",
    )
    parser.add_argument(
        "--sweep-batches",
        default="",
        help="global batch sizes for the sweep, comma-separated, each at the recipe's lr and the sweep's token "
        "budget (steps scaled), e.g. 32,128",
    )
    parser.add_argument(
        "--set",
        dest="sets",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="recipe settings added to every pretraining run (pretrain's --set), e.g. model.dropout=0.1",
    )
    parser.add_argument(
        "--models",
        default=",".join(DEFAULT_MODELS),
        help=f"comma-separated, from {','.join(MODELS)} (-post: BERT's post-LN block layout)",
    )
    parser.add_argument("--tasks", default=None, help="subset of the fine-tuning tasks, comma-separated")
    parser.add_argument("--no-finetune", action="store_true", help="stop after pretraining")
    parser.add_argument("--no-ablation", action="store_true", help="skip the runs without the embedding LayerNorm")
    parser.add_argument(
        "--unlabeled",
        default="",
        help="GLUE tasks whose training sentences, without their labels, are added to the pretraining "
        "corpus (task-adaptive pretraining, Gururangan et al. 2020), comma-separated, e.g. SST-2",
    )
    args = parser.parse_args(argv)
    corpus = args.corpus or [DEFAULT_CORPUS]
    for path in corpus:
        if not path.is_file():
            raise BenchError(f"corpus file {path} not found (set it with --corpus)")
    args.corpus = corpus
    if not args.heldout.is_file():
        raise BenchError(f"held-out file {args.heldout} not found (set it with --heldout)")
    if not args.no_finetune and not args.glue_dir.is_dir():
        raise BenchError(f"GLUE folder {args.glue_dir} not found (set it with --glue-dir, or pass --no-finetune)")
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        raise BenchError(f"--models: unknown model {unknown[0]!r} (choose from {', '.join(MODELS)})")
    if "bert-hf" in args.models:
        from bench.reference_bert import import_transformers

        try:
            import_transformers()
        except SystemExit:
            raise BenchError(
                "Hugging Face transformers is not installed (the reference model): pip install -e '.[hf]'"
            ) from None
    return args


def unlabeled_text(glue_dir: Path, task: str, out: Path) -> Path:
    """The training sentences of a GLUE task (both sentences of a pair), one per line, labels dropped:
    in-domain text for pretraining. Only train.tsv is read; dev (what fine-tuning reports) never is."""
    from finetune.data import read_split
    from finetune.tasks import get_task

    spec = get_task(task)
    if spec.train is None:
        raise BenchError(f"--unlabeled: {spec.name} has no training data")
    examples = read_split(spec, spec.train, glue_dir=str(glue_dir))
    lines = examples.text_a + (examples.text_b or [])
    path = out / f"unlabeled-{spec.name}-train.txt"
    path.write_text("\n".join(" ".join(t.split()) for t in lines if t.strip()) + "\n", encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except RuntimeError as err:  # a stage failed: its command and the tail of its log
        print(f"bench.quality: {err}", file=sys.stderr)
        return 1


def run(argv: list[str] | None = None) -> int:
    from pretrain.config import config_path

    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.steps:
        size = Size(**{**asdict(size), "steps": args.steps, "tasks": size.tasks})  # asdict flattens the recipes
    if args.sets:
        size = Size(**{**asdict(size), "model_sets": size.model_sets + tuple(args.sets), "tasks": size.tasks})
    seeds = tuple(int(s) for s in args.seeds.split(",")) if args.seeds else size.seeds
    if args.tasks:
        wanted = [t.strip() for t in args.tasks.split(",")]
        unknown = [t for t in wanted if t not in {r.task for r in size.tasks}]
        if unknown:
            raise BenchError(
                f"--tasks: no recipe for {unknown[0]!r} (choose from {', '.join(r.task for r in size.tasks)})"
            )
        size = Size(**{**asdict(size), "tasks": tuple(r for r in size.tasks if r.task in wanted)})
    sweep_lrs = size.sweep_lrs if args.sweep_lrs is None else tuple(float(x) for x in args.sweep_lrs.split(",") if x)
    sweep_batches = tuple(int(x) for x in args.sweep_batches.split(",") if x)
    out = (args.out or (ROOT / "runs" / "bench" / "quality-quick" if args.quick else DEFAULT_OUT)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    corpus = list(args.corpus) + [
        unlabeled_text(args.glue_dir, task.strip(), out) for task in args.unlabeled.split(",") if task.strip()
    ]
    data, heldout = build_data(corpus, args.heldout, out, size)
    described = (
        f"{', '.join(p.name for p in corpus)} -> held out {args.heldout.name}; "
        f"{json.loads((data / 'manifest.json').read_text())['splits']['train']['tokens']:,} training tokens"
    )
    log(f"data: {described}")

    curves = {
        m: pretrain(m, mixer, size, data, heldout, out, size.steps, extra_sets=sets)
        for m in args.models
        for mixer, sets in [VARIANTS.get(m, (m, ()))]
    }
    ablation = [
        pretrain(
            f"{m}-no-embln", m, size, data, heldout, out, size.steps, extra_sets=("model.embedding_layer_norm=false",)
        )
        for m in OURS
        if m in args.models and not args.no_ablation
    ]
    if ablation:
        plot_curves(
            [curves[m] for m in OURS if m in curves] + [curves[m] for m in ("bert-hf",) if m in curves] + ablation,
            out / "ablation.png",
            f"with and without the embedding LayerNorm, {size.steps} steps",
        )
    sweep = [
        pretrain(f"{m}-lr{lr:g}", m, size, data, heldout, out, size.sweep_steps, lr)
        for m in OURS
        if m in args.models
        for lr in sweep_lrs
    ] + [  # other global batches at the sweep's token budget (steps scaled) and the recipe's lr
        pretrain(
            f"{m}-batch{b}",
            m,
            size,
            data,
            heldout,
            out,
            max(1, size.sweep_steps * size.global_batch // b),
            extra_sets=(f"batch.global_batch_size={b}", f"batch.micro_batch_size={max(1, b // size.procs)}"),
        )
        for m in OURS
        if m in args.models
        for b in sweep_batches
    ]
    title = f"{RECIPE} recipe, {described}, {size.steps} steps x {size.global_batch} x 128 tokens"
    plot_curves(list(curves.values()), out / "pretraining.png", title)
    if sweep:
        recipe_lr = json.loads(config_path(RECIPE).read_text())["optim"]["lr"]
        same_budget = [  # the recipe's lr at the sweep's length (the main runs themselves when as long)
            {**curves[m], "lr": recipe_lr}
            if size.steps == size.sweep_steps
            else pretrain(f"{m}-lr{recipe_lr:g}", m, size, data, heldout, out, size.sweep_steps, recipe_lr)
            for m in OURS
            if m in args.models
        ]
        plot_curves(
            same_budget + sweep,
            out / "sweep.png",
            f"sweep at {size.sweep_steps} steps x {size.global_batch} x 128 tokens (lr: peak learning rate; batch: "
            "global batch, steps scaled to the same tokens)",
        )
        sweep = same_budget + sweep

    runs, majority, summary = [], {}, {}
    tasks = [t.task for t in size.tasks]
    if not args.no_finetune:
        majority = majority_scores(args.glue_dir, size.tasks)
        releases = {m: export(m, out) for m in OURS if m in args.models}
        jobs = [
            (releases[m], recipe, init, seed)
            for recipe in size.tasks
            for m in releases
            for init in ("scratch", "pretrained")
            for seed in seeds
        ]  # task by task: tables fill in order
        log(f"fine-tuning: {len(jobs)} runs, two at a time")
        with ThreadPoolExecutor(max_workers=2) as pool:  # one thread each: two processes fill the 2 cores
            runs = list(pool.map(lambda job: finetune(*job, args.glue_dir, out), jobs))
        summary = summarize(runs)
        plot_downstream(summary, majority, tasks, out / "downstream.png")

    gap = reference_gap(curves)
    gap_post = reference_gap(curves, "transformer-post")
    report = {
        # shlex.join keeps empty arguments (--sweep-lrs '') so the recorded command can be pasted back
        "command": "python -m bench.quality " + shlex.join(sys.argv[1:] if argv is None else argv),
        "recipe": f"pretrain/configs/{RECIPE}.json",
        "size": asdict(size),
        "corpus": described,
        "cpu_count": os.cpu_count(),
        "minutes_total": (time.monotonic() - began) / 60,
        "pretraining": curves,
        "ablation": ablation,
        "sweep": sweep,
        "reference_gap": gap,
        "reference_gap_post": gap_post,
        "finetune_runs": runs,
        "downstream": summary,
        "majority": majority,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [
        "# bench.quality",
        "",
        f"`{report['command']}` — {described}; recipe `{report['recipe']}`, "
        f"{size.steps} steps x {size.global_batch} sequences x 128 tokens per model, {size.procs} process(es).",
        "",
        "## Pretraining (held-out MLM, final evaluation)",
        "",
        *pretraining_table(list(curves.values())),
        "",
        "![curves](pretraining.png)",
    ]
    for model, model_gap in (("Our transformer", gap), ("Our transformer with post-LN blocks", gap_post)):
        if model_gap:
            late = [g for g in model_gap if g["tokens"] > 0.1 * model_gap[-1]["tokens"]]
            lines += [
                "",
                f"{model}: held-out loss relative to the Hugging Face BERT reference, per evaluation "
                "after the first 10% of training: " + ", ".join(f"{100 * g['relative']:+.1f}%" for g in late),
            ]
    if ablation:
        lines += [
            "",
            "## Ablation: no LayerNorm on the embeddings (the encoder before this benchmark)",
            "",
            *pretraining_table(ablation),
            "",
            "![ablation](ablation.png)",
        ]
    if sweep:
        lines += [
            "",
            "## Sweep: peak learning rate and global batch",
            "",
            *pretraining_table(sweep),
            "",
            "![sweep](sweep.png)",
        ]
    if summary:
        lines += [
            "",
            f"## Fine-tuning (dev, mean ± std over seeds {','.join(map(str, seeds))}; "
            "SST-2/RTE/MRPC: GLUE task score (MRPC: mean of F1 and accuracy), CoLA: MCC; x100)",
            "",
            *downstream_table(summary, majority, tasks),
            "",
            "| task | lr | epochs | max seq len | training examples |",
            "|---|---:|---:|---:|---:|",
            *[
                f"| {t.task} | {t.lr:g} | {t.epochs} | {t.max_seq_len} | {t.max_train_examples or 'all'} |"
                for t in size.tasks
            ],
            "",
            "![downstream](downstream.png)",
        ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines[2:]))
    print(f"\nwrote {out}/results.md, results.json and the PNGs ({report['minutes_total']:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
