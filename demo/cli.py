"""`python -m demo`: the stages in order, reusing what is finished, then the results and where
everything went."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from demo import report, stages
from demo.sizes import CORPUS_NAME, MIXERS, SIZES
from demo.stages import DemoError, display_path, header

EXIT_ERROR = 2


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m demo",
        description="The whole pipeline on data shipped with the project: tokenizer + shards, DeepSpeed "
        "pretraining (2 CPU processes, ZeRO-2), release, SST-2 fine-tuning, results table and plots. "
        "Finished stages are reused on a re-run.",
    )
    parser.add_argument("--mixer", choices=MIXERS, default="hypermixer", help="token mixer (default: hypermixer)")
    parser.add_argument(
        "--compare",
        action="store_true",
        help="run both mixers (hypermixer and transformer) and compare them in one table",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="default",
        help="default: minutes per stage on 2 cores; ci: toy sizes for the end-to-end test",
    )
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--force", action="store_true", help="redo every stage instead of reusing finished ones")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    size = SIZES[args.size]
    mixers = list(MIXERS) if args.compare else [args.mixer]
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {args.out}: exists and is not a folder")
    logs = out / "logs"
    started = time.monotonic()
    total = 1 + 3 * len(mixers) + 1
    number, times, stamps = 0, {}, {}

    def stage(title: str, key: str, fn, *fn_args) -> dict:
        nonlocal number
        number += 1
        header(number, total, title)
        began = time.monotonic()
        stamp = fn(*fn_args, size, args.force, logs)
        times[key] = (time.monotonic() - began, stamp.get("seconds"), stamp.get("reused", False))
        stamps[key] = stamp
        return stamp

    data_dir = out / "data"
    data = stage(
        f"data: WordPiece tokenizer + packed webdataset shards from {CORPUS_NAME}", "data", stages.build_data, data_dir
    )
    for mixer in mixers:
        run_dir, release, sweep = out / f"pretrain-{mixer}", out / f"release-{mixer}", out / f"finetune-{mixer}"
        pre = stage(
            f"pretrain {mixer}: masked LM, deepspeed launcher, 2 CPU processes, ZeRO-2",
            f"pretrain-{mixer}",
            stages.pretrain,
            run_dir,
            data_dir,
            data["id"],
            mixer,
        )
        rel = stage(
            f"release {mixer}: export the checkpoint and check it",
            f"release-{mixer}",
            stages.export,
            release,
            run_dir,
            pre["id"],
            mixer,
        )
        stage(
            f"fine-tune {mixer} on the SST-2 sample: pretrained and from scratch",
            f"finetune-{mixer}",
            stages.finetune,
            sweep,
            release,
            rel["id"],
            mixer,
        )

    header(total, total, "results")
    results = report.collect(out, mixers, stamps)
    text, files = report.write(results, out)
    print(text)
    print_summary(out, mixers, times, files, started)


def print_summary(out: Path, mixers: list[str], times: dict, files: list[Path], began: float) -> None:
    print("stage times (a reused stage shows the time it took when it ran):")
    for key, (now, then, was_reused) in times.items():
        note = f"reused ({then:.0f} s when it ran)" if was_reused else f"{now:.0f} s"
        print(f"  {key:<22} {note}")
    print(f"  {'total (this run)':<22} {time.monotonic() - began:.0f} s")
    rows = [(out / "data", "tokenizer.json, manifest.json, train/ and validation/ shards")]
    for m in mixers:
        rows += [
            (out / f"pretrain-{m}", "metrics.jsonl, run_status.json, checkpoints/, wandb/ (offline)"),
            (out / f"release-{m}", "the release: config.json, model.safetensors, tokenizer.json, README.md"),
            (out / f"finetune-{m}", "the sweep: runs/<run>/ (result.json, metrics.jsonl, model/), results.md"),
        ]
    rows += [(out / "logs", "every command's output")]
    names = [display_path(path) + "/" for path, _ in rows] + [display_path(f) for f in files]
    width = max(len(n) for n in names)
    print("\nwhere everything went:")
    for name, (_, what) in zip(names, rows):
        print(f"  {name:<{width}}  {what}")
    for name in names[len(rows) :]:
        print(f"  {name}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run(args)
    except DemoError as err:
        print(f"demo: error: {err}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(
            "\ndemo: interrupted; run the same command again to continue (finished stages are reused)",
            file=sys.stderr,
            flush=True,
        )
        return 130
    return 0
