"""Long documents: HyperMixer's linear cost against the transformer's on a real task, IMDB reviews.

    python -m bench.long                                   # from scratch (no releases given)
    python -m bench.long --release hypermixer=PATH --release transformer=PATH   # from equally pretrained releases
    python -m bench.long --quick                           # the whole code path at toy size, a couple of minutes

(a) Fine-tuning: `python -m finetune train --train-file` on the labelled IMDB reviews (a fixed dev split of
`--dev-size` reviews, chosen by a hash of their ids) at 128, 512, 1,024 and 2,048 tokens (longer reviews are
truncated), hypermixer against transformer, 3 seeds per cell. A release shorter than a length is extended
with `--extend-positions`; without releases both mixers start from random weights of the `tiny` shape with a
WordPiece tokenizer trained on the training part. Per cell: dev accuracy (best epoch), seconds per epoch
(the training pass alone), training tokens/s (real tokens, padding not counted) and the fine-tuning
process's peak resident memory (evaluation batches are as large as training batches).
(b) Pretraining throughput through the real entry point (`pretrain/main.py` under torchrun, 2 processes,
the `cpu` recipe) at 512, 1,024 and 2,048 tokens on data_pipeline shards of review text built at that
length: tokens/s from the trainer's metrics.jsonl (every log window but the first), and peak memory (the
largest process's resident set).
(c) One plot: dev accuracy against seconds per epoch, a point per length and mixer.

Attention dropout is 0 for both mixers (a release with another value is fine-tuned from a copy with 0), so
the transformer keeps torch's fused SDPA path; results.json records it. Part (b) runs first (minutes); then the
fine-tuning cells, interleaved (every length and mixer of seed 0, then seed 1, ...); a rerun skips finished
cells. Writes results.json (with the exact command), results.md and long.png into --out after every cell; the
cells, runs, shards and releases go to --work. results.json is also the record a rerun continues from: --work
is not kept by git, so on a fresh clone the cells it records are not run again.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRAIN = ROOT.parent / "shared" / "data" / "corpus" / "imdb" / "train.jsonl.gz"
DEFAULT_OUT = ROOT / "bench" / "results" / "long"
QUICK_OUT = ROOT / "runs" / "bench" / "long-quick"
MIXERS: tuple[Literal["hypermixer", "transformer"], ...] = ("hypermixer", "transformer")
CELL_FILE = "cell.json"  # written last in a cell's folder: the cell is finished


@dataclass(frozen=True)
class Size:
    lengths: tuple[int, ...]  # fine-tuning max_seq_len
    seeds: tuple[int, ...]
    epochs: int
    max_train_examples: int | None  # None: the whole training part
    dev_size: int
    batch_size: int
    shape: dict  # encoder shape from scratch (no releases given)
    vocab_size: int
    pretrain_lengths: tuple[int, ...]
    pretrain_steps: int
    pretrain_tokens_per_step: int  # global batch x seq_len
    pretrain_log_every: int
    pretrain_sets: tuple[str, ...] = ()  # extra pretrain overrides (the toy model of --quick)
    timeout_s: int = 6 * 3600  # one launch


FULL = Size(
    lengths=(128, 512, 1024, 2048),
    seeds=(0, 1, 2),
    epochs=2,
    max_train_examples=4000,
    dev_size=2500,
    batch_size=16,
    shape=dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512, max_seq_len=128),  # `tiny`
    vocab_size=8192,
    pretrain_lengths=(512, 1024, 2048),
    pretrain_steps=30,
    pretrain_tokens_per_step=16384,
    pretrain_log_every=5,
)
QUICK = Size(
    lengths=(32, 64),
    seeds=(0, 1),
    epochs=1,
    max_train_examples=None,
    dev_size=40,
    batch_size=16,
    shape=dict(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_seq_len=32),
    vocab_size=600,
    pretrain_lengths=(64,),
    pretrain_steps=6,
    pretrain_tokens_per_step=512,
    pretrain_log_every=2,
    pretrain_sets=(
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.num_heads=2",
        "model.intermediate_size=64",
    ),
    timeout_s=600,
)


class BenchError(Exception):
    """A one-line, user-facing error."""


def log(message: str) -> None:
    print(f"bench.long: {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.long", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the whole code path at toy size (a couple of minutes)")
    parser.add_argument(
        "--out", type=Path, default=None, help=f"results folder (default: {DEFAULT_OUT}, or {QUICK_OUT} with --quick)"
    )
    parser.add_argument(
        "--train-file", type=Path, default=DEFAULT_TRAIN, help="labelled reviews (jsonl/csv/tsv, default: IMDB's)"
    )
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--label-field", default="label")
    parser.add_argument(
        "--release",
        action="append",
        default=[],
        dest="releases",
        metavar="MIXER=FOLDER",
        help="a pretrained release per mixer (hypermixer=..., transformer=...); none: both from scratch",
    )
    parser.add_argument(
        "--extend-positions",
        choices=("copy", "interpolate"),
        default="copy",
        help="how a release shorter than a length is extended (default: copy)",
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="fine-tuning lengths")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--max-train-examples", type=int, default=None, help="training reviews (default: 4000; 0: all)")
    parser.add_argument("--dev-size", type=int, default=None, help="reviews held out as the dev set (default: 2500)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: 1e-4 from releases, 5e-4 from scratch)"
    )
    parser.add_argument("--pretrain-lengths", type=int, nargs="*", default=None, help="none: skip part (b)")
    parser.add_argument("--pretrain-steps", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="fine-tuning device (default: cpu)")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads of a fine-tuning run (default: 2; quick: 1)"
    )
    parser.add_argument("--work", type=Path, default=None, help="cells, runs, data and releases (default: <out>/work)")
    return parser.parse_args(argv)


@dataclass
class Setup:
    """What every cell of a results folder shares; a rerun with other settings is refused."""

    train_file: str
    train_sha256: str  # what is compared: the same file may lie elsewhere in another clone
    text_field: str
    label_field: str
    dev_size: int
    max_train_examples: int | None
    epochs: int
    batch_size: int
    learning_rate: float
    releases: dict[str, str]  # mixer -> the release fine-tuned ({} : from scratch); where it lies, not compared
    extend_positions: str
    device: str
    threads: int  # OMP_NUM_THREADS of each fine-tuning process (pretraining: 1 per rank, 2 ranks)
    pretrain_steps: int
    pretrain_tokens_per_step: int
    pretrain_sets: list[str] = field(default_factory=list)
    release_sha256: dict[str, str] = field(default_factory=dict)  # mixer -> its model.safetensors': compared


NOT_COMPARED = {"train_file", "releases"}  # where the files lie: another clone may keep them elsewhere


def setup_of(args: argparse.Namespace, size: Size) -> Setup:
    from common.files import sha256_file

    examples = size.max_train_examples if args.max_train_examples is None else (args.max_train_examples or None)
    return Setup(
        train_file=str(args.train_file.resolve()),
        train_sha256=sha256_file(args.train_file),
        text_field=args.text_field,
        label_field=args.label_field,
        dev_size=args.dev_size or size.dev_size,
        max_train_examples=examples,
        epochs=args.epochs or size.epochs,
        batch_size=args.batch_size or size.batch_size,
        learning_rate=args.lr or (1e-4 if args.releases else 5e-4),
        releases={},
        extend_positions=args.extend_positions,
        device=args.device,
        threads=args.threads or (1 if size is QUICK else 2),
        pretrain_steps=args.pretrain_steps or size.pretrain_steps,
        pretrain_tokens_per_step=size.pretrain_tokens_per_step,
        pretrain_sets=list(size.pretrain_sets),
    )


def setup_changes(stored: dict, setup: Setup) -> list[str]:
    """Where the training file and the releases lie is not compared (their sha256 are), so a fresh clone beside
    other copies of them continues the record. A key a stored record lacks (written before it existed) counts
    as its default."""
    defaults = {f.name: f.default_factory() for f in fields(Setup) if f.default_factory is not MISSING}
    return [
        f"{k}: {stored.get(k, defaults.get(k))!r} there, {v!r} now"
        for k, v in asdict(setup).items()
        if k not in NOT_COMPARED and stored.get(k, defaults.get(k)) != v
    ]


def check_setup(out: Path, setup: Setup) -> None:
    from common.files import write_json_atomic

    path = out / "setup.json"
    if path.is_file():
        changed = setup_changes(json.loads(path.read_text()), setup)
        if changed:
            raise BenchError(
                f"{out} holds cells made with other settings ({'; '.join(changed)}); use another --out (or --work)"
            )
    else:
        write_json_atomic(path, asdict(setup))


def recorded_cells(path: Path, setup: Setup) -> dict[tuple, dict]:
    """The cells an earlier run of this --out recorded in its results.json. --work is not kept by git, so on a
    fresh clone the committed results.json is what a rerun continues from."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    changed = setup_changes(report["setup"], setup)
    if changed:
        raise BenchError(f"{path} holds cells made with other settings ({'; '.join(changed)}); use another --out")
    cells: dict[tuple, dict] = {
        ("finetune", r["length"], r["mixer"], r["seed"]): r for r in report["finetune"]["cells"]
    }
    cells.update({("pretrain", r["length"], r["mixer"]): r for r in report["pretrain"]["rows"]})
    return cells


# ---- a measured launch -------------------------------------------------------------------------------------


def measured_run(command: list[str], log_path: Path, timeout_s: int, env: dict[str, str] | None = None) -> int:
    """Run `command` (output to log_path) and return the peak resident memory in bytes of its largest
    process: wait4's rusage covers the child and every descendant it waited for (torchrun's ranks)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as handle:
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    break
                if time.monotonic() > deadline:
                    raise BenchError(f"{shlex.join(command)} ran past {timeout_s} s (log: {log_path})")
                time.sleep(0.2)
        except BaseException:  # a timeout or Ctrl-C: the launch (its own session) goes down with us
            os.killpg(process.pid, signal.SIGKILL)
            os.wait4(process.pid, 0)
            process.returncode = -signal.SIGKILL
            raise
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    if process.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise BenchError(f"{shlex.join(command)} failed ({process.returncode}); log {log_path}:\n{tail}")
    return usage.ru_maxrss * 1024  # Linux: KiB


# ---- models --------------------------------------------------------------------------------------------------


def given_releases(items: list[str]) -> dict[str, Path]:
    from hypermixer import read_release_config

    given: dict[str, Path] = {}
    for item in items:
        mixer, sep, path = item.partition("=")
        if not sep or mixer not in MIXERS or not path:
            raise BenchError(f"--release {item!r}: expected hypermixer=FOLDER or transformer=FOLDER")
        try:
            actual = read_release_config(path)["encoder"].mixer
        except (OSError, ValueError) as err:
            raise BenchError(f"--release {item}: not a release folder ({str(err).splitlines()[0]})") from None
        if actual != mixer:
            raise BenchError(f"--release {item}: the release is a {actual}, not a {mixer}")
        given[mixer] = Path(path).resolve()
    if given and set(given) != set(MIXERS):
        raise BenchError("give a release for both mixers (--release hypermixer=... --release transformer=...) or none")
    return given


def scratch_releases(size: Size, setup: Setup, folder: Path) -> dict[str, Path]:
    """Random-weight release folders (the size's shape, attention dropout 0) with a WordPiece tokenizer
    trained on the training part of the file (never the dev rows). Made once, then reused."""
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM

    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        from data_pipeline.tokenizer import train_tokenizer

        tokenizer = train_tokenizer(training_texts(setup), vocab_size=size.vocab_size, min_frequency=2)
        folder.mkdir(parents=True, exist_ok=True)
        tokenizer.save(str(folder / ".tokenizer.json.tmp"))
        os.replace(folder / ".tokenizer.json.tmp", tokenizer_file)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    made: dict[str, Path] = {}
    for mixer in MIXERS:
        target = folder / f"scratch-{mixer}"
        if not (target / "model.safetensors").is_file():
            config = EncoderConfig(vocab_size=vocab, mixer=mixer, attention_dropout=0.0, **size.shape)
            torch.manual_seed(0)
            staging = folder / f".scratch-{mixer}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            ForMaskedLM(config).save_pretrained(staging)
            shutil.copyfile(tokenizer_file, staging / "tokenizer.json")
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)
        made[mixer] = target
    return made


def without_attention_dropout(mixer: str, release: Path, folder: Path) -> Path:
    """`release` itself when its attention dropout is 0, else a copy in `folder` with it set to 0 (weights
    and tokenizer unchanged): dropout on the attention probabilities puts torch's SDPA on its unfused path."""
    config = json.loads((release / "config.json").read_text())
    if config["encoder"].get("attention_dropout", 0.0) == 0.0:
        return release
    target = folder / f"{mixer}-attention-dropout-0"
    if not (target / "config.json").is_file():
        staging = folder / f".{target.name}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(release, staging)
        config["encoder"]["attention_dropout"] = 0.0
        if "attention_probs_dropout_prob" in config:  # the Hugging Face field of the same setting
            config["attention_probs_dropout_prob"] = 0.0
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    return target


def attention_dropout_check(release: Path, length: int) -> dict:
    """The attention dropout every transformer block would train with, read from the model built as
    finetune builds it: 0 in every block is what keeps SDPA's fused kernels."""
    from hypermixer import ForSequenceClassification, read_release_config
    from hypermixer.mixers.attention import SelfAttention

    config = read_release_config(release)["encoder"]
    model = ForSequenceClassification(config.replace(max_seq_len=max(length, config.max_seq_len)), num_labels=2)
    values = [m.attention_dropout for m in model.modules() if isinstance(m, SelfAttention)]
    return {"config": config.attention_dropout, "blocks": values, "fused_sdpa_path": all(v == 0 for v in values)}


def training_texts(setup: Setup) -> list[str]:
    """The texts of the training part of the file (the dev rows left out), in file order."""
    from finetune.files import read_table, training_rows
    from finetune.tasks import Columns, FileSpec

    spec = FileSpec(setup.train_file, None, None, setup.dev_size, None)
    table = read_table(setup.train_file, Columns(setup.text_field, None, label=setup.label_field), None)
    return [table.text[row] for row in training_rows(spec, table)]


# ---- (a) fine-tuning -------------------------------------------------------------------------------------------


def finetune_cell(setup: Setup, release: Path, mixer: str, length: int, seed: int, folder: Path, size: Size) -> dict:
    """One fine-tuning run, or its stored record when the cell is finished."""
    from common.files import write_json_atomic
    from hypermixer import read_release_config

    done = folder / CELL_FILE
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    scratch = not setup.releases
    release_length = read_release_config(release)["encoder"].max_seq_len
    command = [
        sys.executable, "-m", "finetune", "train",
        "--release", str(release),
        "--train-file", setup.train_file,
        "--text-field", setup.text_field,
        "--label-field", setup.label_field,
        "--dev-size", str(setup.dev_size),
        "--output-dir", str(folder / "run"),
        "--max-seq-len", str(length),
        "--long-inputs", "truncate",
        "--epochs", str(setup.epochs),
        "--batch-size", str(setup.batch_size),
        "--eval-batch-size", str(setup.batch_size),
        "--lr", str(setup.learning_rate),
        "--seed", str(seed),
        "--device", setup.device,
        "--no-save-model", "--no-predict",
    ]  # fmt: skip
    if setup.max_train_examples:
        command += ["--max-train-examples", str(setup.max_train_examples)]
    if scratch:
        command.append("--from-scratch")
    elif length > release_length:
        command += ["--extend-positions", setup.extend_positions]
    env = {**os.environ, "OMP_NUM_THREADS": str(setup.threads)}
    peak = measured_run(command, folder / "finetune.log", size.timeout_s, env=env)
    result = json.loads((folder / "run" / "result.json").read_text())
    train_seconds = [epoch["train_seconds"] for epoch in result["history"]]
    record = {
        "length": length,
        "mixer": mixer,
        "seed": seed,
        "accuracy": result["dev"][next(iter(result["dev"]))]["accuracy"],
        "best_epoch": result["best_epoch"],
        "train_seconds_per_epoch": statistics.median(train_seconds),
        "epoch_seconds_with_dev": statistics.median(epoch["seconds"] for epoch in result["history"]),
        "train_tokens_per_epoch": result["train_tokens_per_epoch"],
        "tokens_per_s": result["train_tokens_per_epoch"] / statistics.median(train_seconds),
        "peak_rss_gib": peak / 2**30,
        "train_examples": result["train_examples"],
        "extended_from": None if scratch or length <= release_length else release_length,
        "command": shlex.join(command),
    }
    write_json_atomic(done, record)
    return record


def summarize_finetune(records: list[dict]) -> list[dict]:
    rows = []
    for length in sorted({r["length"] for r in records}):
        for mixer in MIXERS:
            cell = [r for r in records if r["length"] == length and r["mixer"] == mixer]
            if not cell:
                continue
            accuracy = [r["accuracy"] for r in cell]
            rows.append(
                {
                    "length": length,
                    "mixer": mixer,
                    "seeds": [r["seed"] for r in cell],
                    "accuracy": accuracy,
                    "accuracy_mean": statistics.mean(accuracy),
                    "accuracy_std": statistics.stdev(accuracy) if len(accuracy) > 1 else 0.0,
                    "train_seconds_per_epoch": statistics.median(r["train_seconds_per_epoch"] for r in cell),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in cell),
                    "peak_rss_gib": max(r["peak_rss_gib"] for r in cell),
                    "train_tokens_per_epoch": cell[0]["train_tokens_per_epoch"],
                }
            )
    return rows


def compare_finetune(rows: list[dict]) -> list[dict]:
    """Per length: HyperMixer against the transformer (accuracy in points, time and memory as ratios)."""
    by = {(r["length"], r["mixer"]): r for r in rows}
    out = []
    for length in sorted({r["length"] for r in rows}):
        hm, tf = by.get((length, "hypermixer")), by.get((length, "transformer"))
        if hm and tf:
            out.append(
                {
                    "length": length,
                    "accuracy_points": 100 * (hm["accuracy_mean"] - tf["accuracy_mean"]),
                    "seconds_ratio": hm["train_seconds_per_epoch"] / tf["train_seconds_per_epoch"],
                    "tokens_per_s_ratio": hm["tokens_per_s"] / tf["tokens_per_s"],
                    "peak_rss_ratio": hm["peak_rss_gib"] / tf["peak_rss_gib"],
                }
            )
    return out


# ---- (b) pretraining throughput --------------------------------------------------------------------------------


def pretrain_text(setup: Setup, folder: Path, tokens_needed: int) -> Path:
    """Review text for the pretraining shards: training-part texts, one a line, repeated until the file
    holds about twice the characters the launches read (~4 characters a token)."""
    path = folder / "text.txt"
    if not path.is_file():
        texts = [" ".join(t.split()) for t in training_texts(setup)]
        lines: list[str] = []
        characters = 0
        while characters < 8 * tokens_needed:
            for text in texts:
                lines.append(text)
                characters += len(text)
                if characters >= 8 * tokens_needed:
                    break
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".text.txt.tmp").write_text("\n".join(lines) + "\n")
        os.replace(folder / ".text.txt.tmp", path)
    return path


def pretrain_cell(setup: Setup, size: Size, mixer: str, length: int, data: Path, folder: Path) -> dict:
    from bench.pretrain import launch_environment, pretrain_command, steady_tokens_per_s
    from common.files import write_json_atomic
    from pretrain.metrics import read_metrics

    done = folder / CELL_FILE
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(folder, ignore_errors=True)
    batch = max(2, setup.pretrain_tokens_per_step // length)
    batch += batch % 2  # two processes: an even global batch
    sets = [
        f"data.path={data}",
        f"model.mixer={mixer}",
        "model.attention_dropout=0.0",
        f"optim.total_steps={setup.pretrain_steps}",
        "optim.warmup_steps=1",
        f"batch.global_batch_size={batch}",
        f"batch.micro_batch_size={batch // 2}",
        f"logging.every_steps={size.pretrain_log_every}",
        "eval.every_steps=0",
        "eval.max_samples=8",
        "checkpoint.every_steps=0",
        "logging.wandb.mode=disabled",
        *setup.pretrain_sets,
    ]
    command = pretrain_command(folder / "run", sets, procs=2, config="cpu")
    peak = measured_run(command, folder / "pretrain.log", size.timeout_s, env=launch_environment())
    records = read_metrics(folder / "run")
    trains = [r for r in records if r["kind"] == "train"]
    if len(trains) < 2:
        raise BenchError(f"{folder / 'run'}: fewer than two log windows in metrics.jsonl; raise --pretrain-steps")
    record = {
        "length": length,
        "mixer": mixer,
        "global_batch": batch,
        "steps": setup.pretrain_steps,
        "tokens_per_s": steady_tokens_per_s(records),
        "peak_rss_gib": peak / 2**30,
        "rank0_memory_gib_max": max(r["memory_gib"] for r in trains),
        "command": shlex.join(command),
    }
    shutil.rmtree(folder / "run" / "checkpoints", ignore_errors=True)  # only metrics.jsonl is read
    write_json_atomic(done, record)
    return record


def compare_pretrain(rows: list[dict]) -> list[dict]:
    by = {(r["length"], r["mixer"]): r for r in rows}
    out = []
    for length in sorted({r["length"] for r in rows}):
        hm, tf = by.get((length, "hypermixer")), by.get((length, "transformer"))
        if hm and tf:
            out.append(
                {
                    "length": length,
                    "tokens_per_s_ratio": hm["tokens_per_s"] / tf["tokens_per_s"],
                    "peak_rss_ratio": hm["peak_rss_gib"] / tf["peak_rss_gib"],
                }
            )
    return out


# ---- the run --------------------------------------------------------------------------------------------------


def run(argv: list[str]) -> int:
    from common.files import sha256_file, write_json_atomic, write_text_atomic

    args = parse_args(argv)
    size = QUICK if args.quick else FULL
    out = (args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)).resolve()
    if not args.train_file.is_file():
        raise BenchError(f"{args.train_file}: no such file (give the labelled reviews with --train-file)")
    lengths = args.lengths or list(size.lengths)
    seeds = args.seeds if args.seeds is not None else list(size.seeds)
    pretrain_lengths = list(size.pretrain_lengths) if args.pretrain_lengths is None else args.pretrain_lengths
    setup = setup_of(args, size)
    given = given_releases(args.releases)
    work = (args.work or out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    setup.releases = {mixer: str(path) for mixer, path in given.items()}
    setup.release_sha256 = {mixer: sha256_file(path / "model.safetensors") for mixer, path in given.items()}
    check_setup(work, setup)  # before anything is made in it
    releases = given or scratch_releases(size, setup, work / "releases")
    releases = {mixer: without_attention_dropout(mixer, path, work / "releases") for mixer, path in releases.items()}
    attention = {mixer: attention_dropout_check(releases[mixer], max(lengths)) for mixer in MIXERS}
    if not attention["transformer"]["fused_sdpa_path"]:
        raise BenchError(f"{releases['transformer']}: attention dropout is not 0 in every block")

    recorded = recorded_cells(out / "results.json", setup)
    cells = [(seed, length, mixer) for seed in seeds for length in lengths for mixer in MIXERS]
    planned = len(cells) + len(pretrain_lengths) * len(MIXERS)
    records: list[dict] = []
    pretrain_rows: list[dict] = []

    def write_report() -> None:
        """After every cell, so that what a stopped run measured is on record (and committed) for its rerun."""
        finetune_rows = summarize_finetune(records)
        report = {
            "command": shlex.join(["python", "-m", "bench.long", *argv]),
            "setup": asdict(setup),
            "lengths": lengths,
            "seeds": seeds,
            "model": "the given releases" if given else {"shape": size.shape, "vocab_size": size.vocab_size},
            "attention_dropout": attention,
            "cpu_count": os.cpu_count(),
            "cells_finished": len(records) + len(pretrain_rows),
            "cells_planned": planned,
            "finetune": {
                "cells": records,
                "rows": finetune_rows,
                "hypermixer_vs_transformer": compare_finetune(finetune_rows),
            },
            "pretrain": {
                "recipe": "cpu, 2 processes (torchrun), ZeRO-2, fp32",
                "rows": pretrain_rows,
                "hypermixer_vs_transformer": compare_pretrain(pretrain_rows),
            },
        }
        plot(finetune_rows, out / "long.png")
        write_json_atomic(out / "results.json", report)
        write_text_atomic(out / "results.md", markdown(report))

    # Part (b) first: a few minutes, against hours of fine-tuning cells.
    missing = [length for length in pretrain_lengths for mixer in MIXERS if ("pretrain", length, mixer) not in recorded]
    if missing:
        from bench.pretrain import shards

        data_folder = work / "pretrain-data"
        text = pretrain_text(setup, data_folder, setup.pretrain_steps * setup.pretrain_tokens_per_step)
    tokenizer = None
    for length in pretrain_lengths:
        if length in missing:
            data = shards(text, length, "shards", tokenizer, work=data_folder, vocab_size=size.vocab_size)
            tokenizer = tokenizer or data / "tokenizer.json"  # one tokenizer for every length
        for mixer in MIXERS:
            if ("pretrain", length, mixer) in recorded:
                pretrain_rows.append(recorded["pretrain", length, mixer])
                continue
            log(f"pretraining throughput: {mixer} at {length} tokens")
            pretrain_rows.append(
                pretrain_cell(setup, size, mixer, length, data, work / "pretrain" / f"{length}-{mixer}")
            )
            write_report()

    for number, (seed, length, mixer) in enumerate(cells, start=1):
        folder = work / "finetune" / f"{length}-{mixer}-seed{seed}"
        if ("finetune", length, mixer, seed) in recorded:
            records.append(recorded["finetune", length, mixer, seed])
            continue
        log(f"fine-tuning {number}/{len(cells)}: {mixer} at {length} tokens, seed {seed}")
        records.append(finetune_cell(setup, releases[mixer], mixer, length, seed, folder, size))
        write_report()

    write_report()
    print((out / "results.md").read_text())
    return 0


# ---- the report -----------------------------------------------------------------------------------------------


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for index, mixer in enumerate(MIXERS):
        mine = [r for r in rows if r["mixer"] == mixer]
        if not mine:
            continue
        x = [r["train_seconds_per_epoch"] for r in mine]
        y = [100 * r["accuracy_mean"] for r in mine]
        axis.errorbar(
            x, y, yerr=[100 * r["accuracy_std"] for r in mine], marker="o", color=f"C{index}", capsize=3, label=mixer
        )
        for r, xi, yi in zip(mine, x, y):
            axis.annotate(str(r["length"]), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))  # 1, 2, 5 x 10^k seconds, written plainly
    axis.xaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
    axis.xaxis.set_minor_formatter(ticker.NullFormatter())
    axis.set(
        xlabel="training seconds per epoch (log scale)",
        ylabel="dev accuracy (%, mean ± std over seeds)",
        title="accuracy against training cost; labels: tokens per review",
    )
    axis.legend()
    figure.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)


def markdown(report: dict) -> str:
    return "\n".join(
        [
            "# Long documents: accuracy and cost against length",
            "",
            f"Command: `{report['command']}`",
            "",
            *tables(report),
        ]
    )


def tables(report: dict) -> list[str]:
    """The report's text and tables under its command (docs/results.md shows them too, through bench.report)."""
    setup = report["setup"]
    source = ", ".join(f"{m}: `{p}`" for m, p in setup["releases"].items()) or "random weights (no releases given)"
    attention = "; ".join(
        f"{m} {v['config']:g}" + (" (fused SDPA path)" if m == "transformer" and v["fused_sdpa_path"] else "")
        for m, v in report["attention_dropout"].items()
    )
    finished, planned = report["cells_finished"], report["cells_planned"]
    lines = [
        *(
            [f"Partial: {finished} of {planned} cells finished so far (a rerun continues).", ""]
            if finished < planned
            else []
        ),
        f"Fine-tuning on `{Path(setup['train_file']).name}` ({setup['max_train_examples'] or 'all'} training examples, "
        f"{setup['dev_size']} held out as dev), {setup['epochs']} epoch(s), batch {setup['batch_size']}, "
        f"lr {setup['learning_rate']:g}, seeds {', '.join(map(str, report['seeds']))}, longer inputs truncated; "
        f"from {source}. Attention dropout: {attention}. {setup['threads']} thread(s) per fine-tuning run, "
        f"{report['cpu_count']} CPUs.",
        "",
        "Fine-tuning:",
        "",
        "| tokens | mixer | dev accuracy (mean ± std) | train s/epoch | tokens/s | peak RSS (GiB) |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in report["finetune"]["rows"]:
        lines.append(
            f"| {r['length']} | {r['mixer']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f} | "
            f"{r['train_seconds_per_epoch']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_rss_gib']:.2f} |"
        )
    lines += [
        "",
        "| tokens | HyperMixer − transformer accuracy (points) | s/epoch ratio | tokens/s ratio | peak RSS ratio |",
        "|---:|---:|---:|---:|---:|",
    ]
    for c in report["finetune"]["hypermixer_vs_transformer"]:
        lines.append(
            f"| {c['length']} | {c['accuracy_points']:+.2f} | {c['seconds_ratio']:.2f} | "
            f"{c['tokens_per_s_ratio']:.2f} | {c['peak_rss_ratio']:.2f} |"
        )
    lines += ["", "Plot: `long.png` (accuracy against training seconds per epoch).", ""]
    lines += ["Pretraining throughput:", ""]
    if not report["pretrain"]["rows"]:
        lines.append("Not run.")
    else:
        lines += [
            f"`pretrain/main.py`, {report['pretrain']['recipe']}, {setup['pretrain_steps']} steps of about "
            f"{setup['pretrain_tokens_per_step']:,} tokens; tokens/s from metrics.jsonl (the first log window left "
            "out), peak RSS of the largest process.",
            "",
            "| tokens | mixer | global batch | tokens/s | peak RSS (GiB) |",
            "|---:|---|---:|---:|---:|",
        ]
        for r in report["pretrain"]["rows"]:
            lines.append(
                f"| {r['length']} | {r['mixer']} | {r['global_batch']} | {r['tokens_per_s']:,.0f} | "
                f"{r['peak_rss_gib']:.2f} |"
            )
        lines += ["", "| tokens | tokens/s ratio (HyperMixer / transformer) | peak RSS ratio |", "|---:|---:|---:|"]
        for c in report["pretrain"]["hypermixer_vs_transformer"]:
            lines.append(f"| {c['length']} | {c['tokens_per_s_ratio']:.2f} | {c['peak_rss_ratio']:.2f} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    from finetune.errors import FinetuneError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        return run(argv)
    except (BenchError, FinetuneError) as err:
        print(f"bench.long: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
