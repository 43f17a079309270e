"""A full training step (forward + backward + AdamW) of each token mixer across sequence lengths, side by side.

    python -m bench.models                                  # hypermixer vs transformer, N = 512 ... 32,768, CPU fp32
    python -m bench.models --lengths 512 4096               # fewer lengths, to run it quickly
    python -m bench.models --attention-dropout 0 0.1        # also the transformer with attention dropout 0.1
    python -m bench.models --device cuda --dtype bf16       # GPU, with MFU

The same number of tokens every step (16,384 by default: batch = tokens // N, at least one sequence, so
N = 32,768 is one sequence of 32,768 tokens). Every (mixer, length) cell runs in a fresh process, so its peak
memory is its own; at each length the mixers run one after another, so machine noise hits them alike.
Ratios are HyperMixer (or another mixer) over the transformer. Dropout is 0 in every cell. Tokens per
CPU-second (this process's CPU time, all threads) is printed next to tokens/s: on a machine shared with other
work it moves much less than wall-clock time.

Attention dropout decides torch's SDPA kernel: at 0 (the default here) it takes a fused path whose memory is
linear in N; above 0 torch's CPU SDPA falls back to the math path, which stores the N x N attention matrix
(much slower, quadratic memory). HyperMixer has no attention dropout, so its cells are measured once and shown
in every table. Step memory on CPU: the process's peak RSS minus its RSS once the model and the batch are
built (so it includes the gradients and AdamW's state, ~3x the parameters); on CUDA: peak allocated minus
allocated before the first step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

DEFAULT_LENGTHS = [512, 1024, 2048, 4096, 8192, 16384, 32768]
MIXERS = ["transformer", "hypermixer", "mlpmixer", "fnet"]
DEFAULT_MIXERS = ["transformer", "hypermixer"]
# Dense bf16 peak of one H100 SXM (989 TFLOP/s); pass --peak-tflops for another device.
DEFAULT_PEAK_TFLOPS = {"cuda": 989.0, "cpu": None}


def run_cell(cell: dict) -> dict:
    """Runs in the child process: build the model, time training steps, report throughput and memory."""
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM, flops_per_token

    torch.manual_seed(0)
    device = torch.device(cell["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cell["dtype"]]
    length = cell["length"]
    config = EncoderConfig(
        vocab_size=cell["vocab_size"],
        hidden_size=cell["hidden_size"],
        num_layers=cell["num_layers"],
        num_heads=cell["num_heads"],
        intermediate_size=4 * cell["hidden_size"],
        mixer=cell["mixer"],
        max_seq_len=length,
        dropout=0.0,
        attention_dropout=cell.get("attention_dropout", 0.0),
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

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = forward(ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

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
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(cell["steps"]):
        step()
    sync()
    step_s = (time.perf_counter() - start) / cell["steps"]
    cpu_s = (time.process_time() - start_cpu) / cell["steps"]  # all of this process's threads
    if device.type == "cuda":
        step_mem = torch.cuda.max_memory_allocated() / 2**20 - allocated_before
        rss_peak = None
    else:
        rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
        step_mem = _live_step_memory_mib(step)
    tokens = batch_size * length
    return {
        "compile": bool(cell.get("compile")),
        "mixer": cell["mixer"],
        "length": length,
        "batch_size": batch_size,
        "attention_dropout": config.attention_dropout,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tokens_per_cpu_s": tokens / cpu_s,
        "step_mem_mib": step_mem,
        "rss_peak_default_malloc_mib": rss_peak,
        "tflops": tokens / step_s * flops_per_token(config, length, mlm_fraction=0.15) / 1e12,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _live_step_memory_mib(step) -> float:
    """One more step's peak RSS over the RSS before it, with glibc's mmap threshold fixed at 1 MiB: every freed
    tensor then goes back to the OS at once, so RSS follows the live tensors (activations, gradients, temporaries)
    instead of what malloc keeps cached; with the default (dynamic) threshold a mixer that allocates many
    mid-sized temporaries looks bigger than it is. Timing is done before, with the default allocator."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD: fixed from now on
    libc.malloc_trim(0)
    before = _current_rss_mib()
    with open("/proc/self/clear_refs", "w") as f:  # "5": reset the peak RSS (VmHWM) to the current RSS
        f.write("5")
    step()
    with open("/proc/self/status") as f:
        peak_kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    return peak_kib / 1024 - before


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(cell: dict, timeout_s: float) -> dict:
    """Run one cell in a fresh interpreter; an out-of-memory or timeout becomes a row that says so."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.models", "--cell", json.dumps(cell)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {**cell, "error": f"timeout ({timeout_s:.0f}s)"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["killed"])[-1]
        return {
            **cell,
            "error": "out of memory" if "out of memory" in last.lower() or proc.returncode < 0 else last[:60],
        }
    return json.loads(proc.stdout.strip().splitlines()[-1])


def format_table(rows: list[dict], peak_tflops: float | None) -> str:
    by_key = {(r["mixer"], r["length"]): r for r in rows}
    header = (
        "| mixer | seq len | batch | tokens/s | vs transformer | tokens/CPU-s | vs transformer | step s "
        "| step mem MiB | mem vs transformer | peak RSS MiB (default malloc) | TFLOP/s |"
    )
    if peak_tflops:
        header += " MFU |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in sorted(rows, key=lambda r: (r["length"], MIXERS.index(r["mixer"]))):
        if "error" in row:
            lines.append(
                f"| {row['mixer']} | {row['length']} | | {row['error']} |" + " |" * 8 + (" |" if peak_tflops else "")
            )
            continue
        ref = by_key.get(("transformer", row["length"]))
        ok = ref is not None and "error" not in ref
        speed = f"{row['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ok else "-"
        per_cpu = row.get("tokens_per_cpu_s")
        cpu_speed = (
            f"{per_cpu / ref['tokens_per_cpu_s']:.2f}x" if ok and per_cpu and ref.get("tokens_per_cpu_s") else "-"
        )
        mem = f"{row['step_mem_mib'] / ref['step_mem_mib']:.2f}x" if ok and ref["step_mem_mib"] > 0 else "-"
        line = (
            f"| {row['mixer']} | {row['length']} | {row['batch_size']} | {row['tokens_per_s']:,.0f} | {speed} | "
            f"{_mib(per_cpu)} | {cpu_speed} | "
            f"{row['step_s']:.3f} | {row['step_mem_mib']:,.0f} | {mem} | {_mib(row.get('rss_peak_default_malloc_mib'))} | "
            f"{row['tflops']:.3f} |"
        )
        if peak_tflops:
            line += f" {100 * row['tflops'] / peak_tflops:.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def summary_lines(rows: list[dict], mixer: str = "hypermixer") -> list[str]:
    """Per length, `mixer` over the transformer (tokens/s and step memory); then how flat `mixer`'s own tokens/s
    and memory stay across lengths at the same tokens per step (flat memory here = memory linear in N)."""
    by_key = {(r["mixer"], r["length"]): r for r in rows if "error" not in r}
    out = []
    for length in sorted({r["length"] for r in rows}):
        a, ref = by_key.get((mixer, length)), by_key.get(("transformer", length))
        if a and ref:
            cpu = (
                f" (per CPU-second {a['tokens_per_cpu_s'] / ref['tokens_per_cpu_s']:.2f}x)"
                if a.get("tokens_per_cpu_s") and ref.get("tokens_per_cpu_s")
                else ""
            )
            out.append(
                f"N={length}: {mixer}/transformer tokens/s {a['tokens_per_s'] / ref['tokens_per_s']:.2f}x{cpu}, "
                f"step memory {a['step_mem_mib'] / ref['step_mem_mib']:.2f}x"
            )
        elif a:
            out.append(
                f"N={length}: transformer {next((r['error'] for r in rows if r['mixer'] == 'transformer' and r['length'] == length and 'error' in r), 'not run')}"
            )
    own = [r for (m, _), r in sorted(by_key.items()) if m == mixer]
    if len(own) > 1:
        speeds, mems = [r["tokens_per_s"] for r in own], [r["step_mem_mib"] for r in own]
        per_cpu = [r["tokens_per_cpu_s"] for r in own if r.get("tokens_per_cpu_s")]
        cpu = f" (per CPU-second {min(per_cpu) / max(per_cpu):.2f})" if len(per_cpu) == len(own) else ""
        out.append(
            f"{mixer} across N={own[0]['length']}..{own[-1]['length']}: tokens/s min/max {min(speeds) / max(speeds):.2f}"
            f"{cpu}, step memory max/min {max(mems) / min(mems):.2f}"
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--mixers", nargs="+", default=DEFAULT_MIXERS, choices=MIXERS)
    parser.add_argument("--lengths", nargs="+", type=int, default=None, help=f"default {DEFAULT_LENGTHS}")
    parser.add_argument(
        "--attention-dropout",
        nargs="+",
        type=float,
        default=[0.0],
        help="one table per value; 0 (default) is SDPA's fused path, > 0 its N x N math path on CPU",
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument(
        "--tokens-per-step", type=int, default=16384, help="batch = tokens-per-step // length, at least 1"
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100 bf16 on cuda)"
    )
    parser.add_argument(
        "--timeout", type=float, default=900.0, help="seconds per cell; a cell over it prints 'timeout'"
    )
    parser.add_argument("--quick", action="store_true", help="lengths 512 and 1024, one step")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))))
        return 0
    lengths = args.lengths or ([512, 1024] if args.quick else DEFAULT_LENGTHS)
    peak = args.peak_tflops or DEFAULT_PEAK_TFLOPS[args.device]
    threads = os.environ.get("OMP_NUM_THREADS", os.cpu_count())
    tables = {p: [] for p in args.attention_dropout}
    measured = {}  # mixers without attention are the same model at every attention dropout: measured once
    for length in lengths:
        for p in args.attention_dropout:
            for mixer in args.mixers:
                key = (mixer, length, p if mixer == "transformer" else None)
                if key not in measured:
                    cell = dict(
                        mixer=mixer,
                        length=length,
                        device=args.device,
                        dtype=args.dtype,
                        hidden_size=args.hidden_size,
                        num_layers=args.num_layers,
                        num_heads=args.num_heads,
                        vocab_size=args.vocab_size,
                        tokens_per_step=args.tokens_per_step,
                        steps=1 if args.quick else args.steps,
                        warmup=args.warmup,
                        attention_dropout=p,
                    )
                    measured[key] = measure(cell, args.timeout)
                    status = measured[key].get("error") or f"{measured[key]['tokens_per_s']:,.0f} tokens/s"
                    label = f"{mixer}, attention dropout {p}" if mixer == "transformer" else mixer
                    print(f"  {label:>34} @ {length:>5}: {status}", file=sys.stderr, flush=True)
                tables[p].append(measured[key])
    for p, rows in tables.items():
        one = [n for n in lengths if args.tokens_per_step // n <= 1]
        print(
            f"\nTraining step (forward + backward + AdamW) of ForMaskedLM (15% masked), d={args.hidden_size}, "
            f"layers={args.num_layers}, heads={args.num_heads}, vocab={args.vocab_size}, {args.tokens_per_step:,} tokens/step"
            + (f" (N >= {one[0]}: one sequence of N tokens)" if one else "")
            + f", {args.device} {args.dtype}, torch threads={threads}, dropout 0, attention dropout {p}"
            + (" (SDPA fused path)" if p == 0 else " (SDPA math path on CPU: N x N stored)")
            + "\n"
        )
        print(format_table(rows, peak))
        print("\n" + "\n".join(summary_lines(rows)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r for rows in tables.values() for r in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
