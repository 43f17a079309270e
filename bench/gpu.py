"""The GPU check: at most ~8 minutes on one GPU; CI never runs it.

    python -m bench.gpu            # without CUDA: one line saying it skipped, exit 0

1. bf16 forward+backward tokens/s and MFU of the `base` encoder (d=768, 12 layers) with hypermixer and
   transformer at 128 and 512 tokens, eager against torch.compile(fullgraph=True) (static MLM slots);
2. the long-sequence sweep (d=256, 4 layers, 65,536 tokens per step) from 512 to 65,536 tokens, with
   peak memory, hypermixer against transformer (SDPA).
Every cell runs in a fresh process (bench.models' cells); the tables are bench.models' format.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench.models import format_table, measure

BASE = dict(hidden_size=768, num_layers=12, num_heads=12, vocab_size=30522)
LONG = dict(hidden_size=256, num_layers=4, num_heads=4, vocab_size=8192)
H100_BF16_TFLOPS = 989.0


def cells(quick: bool, lengths: list[int] | None = None) -> tuple[list[dict], list[dict]]:
    steps = dict(steps=3 if quick else 10, warmup=2 if quick else 3)
    base = [
        dict(mixer=m, length=n, device="cuda", dtype="bf16", tokens_per_step=65536, compile=c, **BASE, **steps)
        for c in (False, True)
        for n in (128, 512)
        for m in ("transformer", "hypermixer")
    ]
    if lengths is None:
        lengths = [512, 2048, 8192, 32768] if quick else [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
    long = [
        dict(mixer=m, length=n, device="cuda", dtype="bf16", tokens_per_step=65536, **LONG, **steps)
        for n in lengths
        for m in ("transformer", "hypermixer")
    ]
    return base, long


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peak-tflops", type=float, default=H100_BF16_TFLOPS, help="device bf16 peak, for MFU")
    parser.add_argument("--quick", action="store_true", help="fewer steps and lengths")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per cell")
    parser.add_argument("--no-compile", action="store_true", help="eager cells only (compiling takes minutes)")
    parser.add_argument("--lengths", default=None, help="long-sequence lengths, comma-separated (default: 512-65536)")
    parser.add_argument("--json", type=Path, default=None, help="also write every measured cell here (after each cell)")
    args = parser.parse_args(argv)
    lengths = [int(n) for n in args.lengths.split(",")] if args.lengths else None
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: skipped: no CUDA device (torch.cuda.is_available() is False)")
        return 0
    base, long = cells(args.quick, lengths)
    if args.no_compile:
        base = [cell for cell in base if not cell["compile"]]
    device = f"{torch.cuda.get_device_name()}, torch {torch.__version__}, bf16 autocast"
    print(device, flush=True)
    measured: dict[str, list[dict]] = {}
    for title, group in (("base, eager then compiled", base), ("long sequences, d=256, 4 layers", long)):
        rows = []
        for cell in group:
            rows.append(measure(cell, args.timeout))
            if args.json:  # after every cell, so a run cut short keeps what it measured
                measured[title] = rows
                report = {"command": "python -m bench.gpu " + shlex.join(sys.argv[1:] if argv is None else argv)}
                args.json.write_text(json.dumps({**report, "device": device, "cells": measured}, indent=1) + "\n")
            status = rows[-1].get("error") or f"{rows[-1]['tokens_per_s']:,.0f} tokens/s"
            print(
                f"  {cell['mixer']:>11} @ {cell['length']:>5}{' compiled' if cell.get('compile') else ''}: {status}",
                file=sys.stderr,
                flush=True,
            )
        print(f"\n{title}, 65,536 tokens per step\n")
        for compiled in sorted({bool(r.get("compile")) for r in rows}):
            if title.startswith("base"):
                print("compiled:" if compiled else "eager:")
            print(format_table([r for r in rows if bool(r.get("compile")) == compiled], args.peak_tflops) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
