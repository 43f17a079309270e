"""Forward+backward throughput and memory of each token mixer across sequence lengths, side by side.

    python -m bench.models                                # CPU, fp32
    python -m bench.models --device cuda --dtype bf16     # GPU, with MFU

Every (mixer, length) cell runs in a fresh process, so its peak memory is its own; at each length the
mixers run one after another, so machine noise hits them alike. Ratios are to the transformer.
Same width and depth for every mixer; the MLP-Mixer's static token MLP is sized to the length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_LENGTHS = [128, 512, 1024, 2048, 4096]
HYPERMIXER_EXTRA_LENGTHS = [8192, 16384]
MIXERS = ["transformer", "hypermixer", "mlpmixer", "fnet"]
# Dense bf16 peak of one H100 SXM (989 TFLOP/s); pass --peak-tflops for another device.
DEFAULT_PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}


def run_cell(cell: dict) -> dict:
    """Runs in the child process: build the model, time fwd+bwd steps, report throughput and memory."""
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM, flops_per_token

    torch.manual_seed(0)
    device = torch.device(cell["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cell["dtype"]]
    length = cell["length"]
    config = EncoderConfig(
        vocab_size=cell["vocab_size"], hidden_size=cell["hidden_size"], num_layers=cell["num_layers"],
        num_heads=cell["num_heads"], intermediate_size=4 * cell["hidden_size"], mixer=cell["mixer"],
        max_seq_len=length, dropout=0.0, attention_dropout=0.0,
    )
    model = ForMaskedLM(config).to(device).train()
    forward = model
    if cell.get("compile"):  # static MLM slots, so that model + loss compile as one graph
        from hypermixer import max_predictions_per_seq

        model.max_predictions = max_predictions_per_seq(length, 0.15)
        forward = torch.compile(model, fullgraph=True)
    batch_size = max(1, cell["tokens_per_step"] // length)
    ids = torch.randint(5, config.vocab_size, (batch_size, length), device=device)
    labels = torch.where(torch.rand(ids.shape, device=device) < 0.15, ids, torch.full_like(ids, -100))

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(ids, labels=labels).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = _current_rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        allocated_before = torch.cuda.memory_allocated() / 2**20
    for _ in range(cell["warmup"]):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(cell["steps"]):
        step()
    sync()
    step_s = (time.perf_counter() - start) / cell["steps"]
    if device.type == "cuda":
        step_mem = torch.cuda.max_memory_allocated() / 2**20 - allocated_before
    else:
        step_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    tokens = batch_size * length
    return {
        "compile": bool(cell.get("compile")), "mixer": cell["mixer"], "length": length, "batch_size": batch_size, "step_s": step_s,
        "tokens_per_s": tokens / step_s, "step_mem_mib": step_mem,
        "tflops": tokens / step_s * flops_per_token(config, length, mlm_fraction=0.15) / 1e12,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(cell: dict, timeout_s: float) -> dict:
    """Run one cell in a fresh interpreter; an out-of-memory or timeout becomes a row that says so."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.models", "--cell", json.dumps(cell)],
            capture_output=True, text=True, timeout=timeout_s, env=env,
        )
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"over {timeout_s:.0f}s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {**cell, "error": "out of memory" if "out of memory" in last.lower() or proc.returncode < 0 else last[:60]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], peak_tflops: float | None) -> str:
    by_key = {(r["mixer"], r["length"]): r for r in rows}
    header = "| mixer | seq len | batch | tokens/s | vs transformer | step s | step mem MiB | mem vs transformer | TFLOP/s |"
    if peak_tflops:
        header += " MFU |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in sorted(rows, key=lambda r: (r["length"], MIXERS.index(r["mixer"]))):
        if "error" in row:
            lines.append(f"| {row['mixer']} | {row['length']} | | {row['error']} | | | | | |" + (" |" if peak_tflops else ""))
            continue
        ref = by_key.get(("transformer", row["length"]))
        ok = ref is not None and "error" not in ref
        speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ok else "-"
        mem = f"{row['step_mem_mib'] / ref['step_mem_mib']:.2f}x" if ok and ref["step_mem_mib"] > 0 else "-"
        line = (
            f"| {row['mixer']} | {row['length']} | {row['batch_size']} | {row['tokens_per_s']:,.0f} | {speed} | "
            f"{row['step_s']:.3f} | {row['step_mem_mib']:,.0f} | {mem} | {row['tflops']:.3f} |"
        )
        if peak_tflops:
            line += f" {100 * row['tflops'] / peak_tflops:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def growth_lines(rows: list[dict], short: int, long: int) -> list[str]:
    """Step time at `long` over `short` at the same tokens per step: 1x is linear-time, 4x is quadratic in 4x length."""
    out = []
    by_key = {(r["mixer"], r["length"]): r for r in rows if "error" not in r}
    for mixer in MIXERS:
        a, b = by_key.get((mixer, short)), by_key.get((mixer, long))
        if a and b:
            out.append(f"{mixer}: step time {short} -> {long}: {b['step_s'] / a['step_s']:.2f}x (same tokens per step)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--mixers", nargs="+", default=MIXERS, choices=MIXERS)
    parser.add_argument("--lengths", nargs="+", type=int, default=None)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="batch = tokens-per-step // length")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100 bf16 on cuda)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per cell")
    parser.add_argument("--quick", action="store_true", help="lengths 128 and 512, fewer steps (for the demo)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0
    lengths = args.lengths or ([128, 512] if args.quick else DEFAULT_LENGTHS)
    extra = [] if args.quick or args.lengths else HYPERMIXER_EXTRA_LENGTHS
    peak = args.peak_tflops or DEFAULT_PEAK_TFLOPS[args.device]
    rows = []
    for length in lengths + extra:
        for mixer in args.mixers:
            if length in extra and mixer != "hypermixer":
                continue
            cell = dict(
                mixer=mixer, length=length, device=args.device, dtype=args.dtype, hidden_size=args.hidden_size,
                num_layers=args.num_layers, num_heads=args.num_heads, vocab_size=args.vocab_size,
                tokens_per_step=args.tokens_per_step, steps=1 if args.quick else args.steps, warmup=args.warmup,
            )
            row = measure(cell, args.timeout)
            rows.append(row)
            status = row.get("error") or f"{row['tokens_per_s']:,.0f} tokens/s"
            print(f"  {mixer:>11} @ {length:>5}: {status}", file=sys.stderr, flush=True)
    print(
        f"\nForward+backward of ForMaskedLM (15% masked), d={args.hidden_size}, layers={args.num_layers}, "
        f"heads={args.num_heads}, vocab={args.vocab_size}, {args.tokens_per_step} tokens/step, "
        f"{args.device} {args.dtype}, torch threads={os.environ.get('OMP_NUM_THREADS', os.cpu_count())}\n"
    )
    print(format_table(rows, peak))
    if 1024 in lengths and 4096 in lengths:
        print("\n" + "\n".join(growth_lines(rows, 1024, 4096)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
