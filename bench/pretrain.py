"""Pretraining benchmarks through the real entry point (`pretrain/main.py`, DeepSpeed, data_pipeline shards).

    python -m bench.pretrain throughput   # CPU: training tokens/s, hypermixer vs transformer (same size), seq 128
                                          # and 512, 1 process (ZeRO-0) vs 2 processes (ZeRO-2), interleaved rounds
    python -m bench.pretrain wikitext     # the `tiny` config on WikiText-2, hypermixer and transformer at equal
                                          # steps: held-out MLM loss/accuracy curves -> bench/results/*.json, *.png
    python -m bench.pretrain gpu          # one GPU: bf16 tokens/s and MFU of `base` at seq 128 and 512

Every cell is a fresh launch of the training entry point; numbers come from its metrics.jsonl (training-
step time only: evaluation and checkpoints are excluded, as in the run's own log). The machine these
numbers were first taken on was shared with other work, so cells run in interleaved rounds and the
table reports the median with the range; ratios are computed per round, then their median is taken.

Text: WikiText-2 from ../shared when present (train on valid.txt, held-out test.txt); else --corpus FILE;
else a generated corpus (the table says so).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_WIKITEXT = ROOT.parent / "shared" / "data" / "corpus" / "wikitext-2"
WORK = ROOT / "runs" / "bench"
RESULTS = ROOT / "bench" / "results"
MIXERS = ("hypermixer", "transformer")


# ---------------------------------------------------------------------------------------- data


def corpus_files(corpus: str | None) -> tuple[Path, Path, str]:
    """(training text, held-out text, a description)."""
    if corpus:
        return Path(corpus), Path(corpus), f"{corpus} (no held-out text: validation on the training text)"
    if (SHARED_WIKITEXT / "valid.txt").is_file():
        return (
            SHARED_WIKITEXT / "valid.txt",
            SHARED_WIKITEXT / "test.txt",
            "WikiText-2 raw (train on valid.txt, held out: test.txt)",
        )
    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / "generated.txt"
    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(20, 200))) for _ in range(6000)))
    return path, path, "a generated corpus (WikiText-2 not found): throughput only, curves meaningless"


def shards(
    text: Path, seq_len: int, name: str, tokenizer: Path | None = None, work: Path = WORK, vocab_size: int = 8192
) -> Path:
    """A data_pipeline build of `text` (all sequences in the train split) in work/<name>-<seq_len>, reused
    when already there."""
    from data_pipeline.build import build
    from data_pipeline.config import BuildConfig

    out = work / f"{name}-{seq_len}"
    if not (out / "manifest.json").is_file():
        build(
            BuildConfig(
                inputs=[str(text)],
                out_dir=str(out),
                vocab_size=vocab_size,
                seq_len=seq_len,
                validation_fraction=0.0,
                shard_mb=0.5,
                tokenizer=str(tokenizer) if tokenizer else None,
            ),
            workers=1,
            progress=False,
        )
    return out


# ---------------------------------------------------------------------------------------- one launch


def pretrain_command(run_dir: Path, sets: list[str], procs: int, config: str = "tiny") -> list[str]:
    """The command line of one pretrain/main.py launch (1 process: plain python; more: torchrun)."""
    tail = ["--config", config, "--set", f"output_dir={run_dir}", *sets]
    if procs == 1:
        return [sys.executable, str(ROOT / "pretrain" / "main.py"), *tail]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={procs}",
        str(ROOT / "pretrain" / "main.py"),
        *tail,
    ]


def launch_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", **(env or {})}
    environment.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    return environment


def launch(run_dir: Path, sets: list[str], procs: int, timeout: int, env: dict[str, str] | None = None) -> list[dict]:
    """Run pretrain/main.py (1 process: plain python; more: torchrun) and return its metrics records."""
    from pretrain.metrics import read_metrics

    command = pretrain_command(run_dir, sets, procs)
    environment = launch_environment(env)
    result = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        )
    return read_metrics(run_dir)


def steady_tokens_per_s(records: list[dict]) -> float:
    """Tokens/s over every log window but the first (start-up): total tokens / total time."""
    windows = [r for r in records if r["kind"] == "train"][1:]
    return len(windows) / sum(1.0 / r["tokens_per_s"] for r in windows)  # equal-token windows: harmonic mean


# ---------------------------------------------------------------------------------------- throughput


def throughput(args: argparse.Namespace) -> dict:
    text, _, described = corpus_files(args.corpus)
    cells = []
    for seq_len in args.seq_lens:
        data = shards(text, seq_len, "train")
        batch = max(2, args.tokens_per_step // seq_len)
        for procs in (1, 2):
            for mixer in MIXERS:
                cells.append({"seq_len": seq_len, "procs": procs, "mixer": mixer, "batch": batch, "data": str(data)})
    results: dict[tuple, list[float]] = {}
    for round_index in range(args.rounds):
        for cell in cells:  # interleaved: the two mixers of a (length, processes) pair run back to back
            key = (cell["seq_len"], cell["procs"], cell["mixer"])
            stage = 0 if cell["procs"] == 1 else 2
            sets = [
                f"data.path={cell['data']}",
                f"model.mixer={cell['mixer']}",
                f"optim.total_steps={args.steps}",
                "optim.warmup_steps=1",
                f"batch.global_batch_size={cell['batch']}",
                f"batch.micro_batch_size={cell['batch'] // cell['procs']}",
                f"logging.every_steps={args.log_every}",
                "eval.every_steps=0",
                "eval.max_samples=8",
                "checkpoint.every_steps=0",
                "checkpoint.keep_last=1",
                "logging.wandb.mode=disabled",
                "data.num_workers=1",
                "model.dropout=0.0",
                f"deepspeed.zero_optimization.stage={stage}",
            ]
            run_dir = WORK / "throughput" / f"r{round_index}-{cell['seq_len']}-{cell['procs']}-{cell['mixer']}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            rate = steady_tokens_per_s(launch(run_dir, sets, cell["procs"], timeout=1800))
            results.setdefault(key, []).append(rate)
            print(
                f"round {round_index + 1}/{args.rounds}: seq {key[0]}, {key[1]} process(es), {key[2]}: "
                f"{rate:,.0f} tokens/s",
                flush=True,
            )
    rows = []
    for (seq_len, procs, mixer), rates in sorted(results.items()):
        rows.append(
            {
                "seq_len": seq_len,
                "procs": procs,
                "mixer": mixer,
                "tokens_per_s_median": statistics.median(rates),
                "tokens_per_s_min": min(rates),
                "tokens_per_s_max": max(rates),
                "rounds": rates,
            }
        )
    ratios = []
    for seq_len in args.seq_lens:
        for procs in (1, 2):
            per_round = [
                h / t for h, t in zip(results[(seq_len, procs, "hypermixer")], results[(seq_len, procs, "transformer")])
            ]
            ratios.append(
                {
                    "seq_len": seq_len,
                    "what": f"hypermixer / transformer, {procs} process(es)",
                    "median": statistics.median(per_round),
                    "rounds": per_round,
                }
            )
        for mixer in MIXERS:
            per_round = [two / one for two, one in zip(results[(seq_len, 2, mixer)], results[(seq_len, 1, mixer)])]
            ratios.append(
                {
                    "seq_len": seq_len,
                    "what": f"2 processes ZeRO-2 / 1 process, {mixer}",
                    "median": statistics.median(per_round),
                    "rounds": per_round,
                }
            )
    report = {
        "corpus": described,
        "model": "tiny preset (d=128, 4 layers, 2 heads, MLP 512), fp32, vocab 8192",
        "tokens_per_step": args.tokens_per_step,
        "steps": args.steps,
        "rounds": args.rounds,
        "threads_per_process": 1,
        "cpu_count": os.cpu_count(),
        "rows": rows,
        "ratios": ratios,
    }
    print(f"\ntraining tokens/s on CPU ({os.cpu_count()} cores, 1 thread per process); {described}")
    print(f"{'seq':>5} {'procs':>5} {'mixer':<12} {'tokens/s (median)':>18} {'range':>22}")
    for r in rows:
        print(
            f"{r['seq_len']:>5} {r['procs']:>5} {r['mixer']:<12} {r['tokens_per_s_median']:>18,.0f} "
            f"{r['tokens_per_s_min']:>10,.0f} - {r['tokens_per_s_max']:<10,.0f}"
        )
    print(f"\n{'seq':>5}  {'ratio':<44} {'median':>7}  per round")
    for r in ratios:
        print(f"{r['seq_len']:>5}  {r['what']:<44} {r['median']:>7.2f}  {', '.join(f'{x:.2f}' for x in r['rounds'])}")
    return report


# ---------------------------------------------------------------------------------------- wikitext curves


def wikitext(args: argparse.Namespace) -> dict:
    train_text, heldout_text, described = corpus_files(args.corpus)
    train = shards(train_text, 128, "train")
    heldout = shards(heldout_text, 128, "heldout", tokenizer=train / "tokenizer.json")
    curves = {}
    for mixer in MIXERS:
        run_dir = WORK / "wikitext" / mixer
        subprocess.run(["rm", "-rf", str(run_dir)], check=True)
        sets = [
            f"data.path={train}",
            f"data.validation_path={heldout}",
            "data.validation_split=train",
            f"model.mixer={mixer}",
            f"optim.total_steps={args.steps}",
            f"optim.warmup_steps={min(100, args.steps // 8)}",
            f"eval.every_steps={args.eval_every}",
            f"eval.max_samples={args.eval_samples}",
            "logging.every_steps=10",
            "checkpoint.every_steps=0",
            "logging.wandb.mode=offline",
        ]
        began = time.monotonic()
        records = launch(run_dir, sets, 1, timeout=7200)
        seconds = time.monotonic() - began
        evals = [r for r in records if r["kind"] == "eval"]
        trains = [r for r in records if r["kind"] == "train"]
        curves[mixer] = {
            "wall_seconds": seconds,
            "steps": [r["step"] for r in evals],
            "val_loss": [r["loss"] for r in evals],
            "val_accuracy": [r["accuracy"] for r in evals],
            "val_masked_tokens": evals[-1]["masked_tokens"],
            "train_steps": [r["step"] for r in trains],
            "train_loss": [r["loss"] for r in trains],
            "tokens_per_s": steady_tokens_per_s(records),
        }
        print(
            f"{mixer}: {seconds / 60:.1f} min; final held-out loss {evals[-1]['loss']:.4f}, accuracy "
            f"{evals[-1]['accuracy']:.4f}; best loss {min(c for c in curves[mixer]['val_loss']):.4f}",
            flush=True,
        )
    report = {
        "corpus": described,
        "config": "tiny (shipped), 1 process, fp32, ZeRO-2",
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_samples": args.eval_samples,
        "curves": curves,
    }
    plot(report, RESULTS / "pretrain_wikitext2_tiny.png")
    print(
        f"\n{'mixer':<12} {'final val loss':>15} {'final val acc':>14} {'best val loss':>14} {'at step':>8} "
        f"{'tokens/s':>9} {'minutes':>8}"
    )
    for mixer, c in curves.items():
        best = min(range(len(c["val_loss"])), key=c["val_loss"].__getitem__)
        print(
            f"{mixer:<12} {c['val_loss'][-1]:>15.4f} {c['val_accuracy'][-1]:>14.4f} {c['val_loss'][best]:>14.4f} "
            f"{c['steps'][best]:>8} {c['tokens_per_s']:>9,.0f} {c['wall_seconds'] / 60:>8.1f}"
        )
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for index, (mixer, c) in enumerate(report["curves"].items()):
        color = f"C{index}"  # one colour per mixer across both panels
        loss_axis.plot(c["steps"], c["val_loss"], marker=".", color=color, label=f"{mixer} (held-out)")
        loss_axis.plot(c["train_steps"], c["train_loss"], alpha=0.35, color=color, label=f"{mixer} (train)")
        accuracy_axis.plot(c["steps"], c["val_accuracy"], marker=".", color=color, label=mixer)
    loss_axis.set(xlabel="step", ylabel="MLM loss", title="masked-LM loss")
    accuracy_axis.set(xlabel="step", ylabel="MLM accuracy (held-out)", title="held-out masked-token accuracy")
    loss_axis.legend(fontsize=8)
    accuracy_axis.legend(fontsize=8)
    figure.suptitle(f"tiny config, {report['corpus']}", fontsize=9)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------- GPU


def gpu(args: argparse.Namespace) -> dict:
    """bf16 MFU of `base` on one GPU (MFU against the device's dense bf16 peak, see pretrain.metrics)."""
    text, _, described = corpus_files(args.corpus)
    rows = []
    for seq_len, micro in ((128, 128), (512, 32)):
        data = shards(text, seq_len, "train")
        for mixer in MIXERS:
            run_dir = WORK / "gpu" / f"{seq_len}-{mixer}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            sets = [
                f"data.path={data}",
                "model.preset=base",
                f"model.mixer={mixer}",
                "precision=bf16",
                f"optim.total_steps={args.steps}",
                "optim.warmup_steps=1",
                f"batch.global_batch_size={micro}",
                f"batch.micro_batch_size={micro}",
                f"logging.every_steps={args.log_every}",
                "eval.every_steps=0",
                "eval.max_samples=8",
                "checkpoint.every_steps=0",
                "logging.wandb.mode=disabled",
                "data.num_workers=2",
                "deepspeed.zero_optimization.stage=0",
            ]
            records = [r for r in launch(run_dir, sets, 1, timeout=1800) if r["kind"] == "train"][1:]
            rows.append(
                {
                    "seq_len": seq_len,
                    "mixer": mixer,
                    "micro_batch": micro,
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in records),
                    "tflops_per_device": statistics.median(r["tflops_per_device"] for r in records),
                    "mfu": statistics.median(r["mfu"] for r in records) if records[0]["mfu"] is not None else None,
                }
            )
            print(rows[-1], flush=True)
    return {"corpus": described, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("throughput", "wikitext", "gpu"))
    parser.add_argument("--corpus", help="a text file to use instead of WikiText-2")
    parser.add_argument("--steps", type=int, default=None, help="training steps per launch")
    parser.add_argument("--rounds", type=int, default=3, help="throughput: interleaved rounds")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="throughput: global batch x seq_len")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-every", type=int, default=50, help="wikitext: steps between held-out evaluations")
    parser.add_argument("--eval-samples", type=int, default=1024, help="wikitext: held-out sequences per evaluation")
    parser.add_argument("--out", help="where to write the JSON report (default: bench/results/pretrain_<mode>.json)")
    args = parser.parse_args(argv)
    args.steps = args.steps or {"throughput": 40, "wikitext": 800, "gpu": 60}[args.mode]
    report = {"throughput": throughput, "wikitext": wikitext, "gpu": gpu}[args.mode](args)
    report["command"] = "python -m bench.pretrain " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out) if args.out else RESULTS / f"pretrain_{args.mode}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
