"""Metrics: throughput and MFU arithmetic, and where logged values go (metrics.jsonl, wandb, a progress line).

Only rank 0 writes. `metrics.jsonl` is the record of a run: one JSON object per log step
({"kind": "train"} or {"kind": "eval"}); after a resume it is cut back to the checkpoint's step, so
the file always tells one consistent history.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from common.files import write_text_atomic

METRICS_FILE = "metrics.jsonl"

# Dense (no sparsity) peak TFLOP/s per device for bf16/fp16 matmuls, from the vendors' datasheets (SXM parts).
# Matched by substring of torch.cuda.get_device_name(); pass metrics.peak_tflops for anything else.
PEAK_TFLOPS_16BIT = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def default_peak_tflops(device_name: str | None, precision: str) -> float | None:
    """A known GPU's bf16/fp16 peak; None on CPU, for fp32, or for an unknown device."""
    if not device_name or precision not in ("bf16", "fp16"):
        return None
    for key, peak in PEAK_TFLOPS_16BIT.items():
        if key in device_name:
            return peak
    return None


def throughput(
    tokens: int, samples: int, seconds: float, world_size: int, flops_per_token: float, peak_tflops: float | None
) -> dict[str, float | None]:
    """tokens/s and samples/s of the whole job, achieved TFLOP/s per device, and MFU (None without a peak)."""
    tokens_per_s = tokens / seconds if seconds > 0 else 0.0
    tflops_per_device = tokens_per_s * flops_per_token / world_size / 1e12
    return {
        "tokens_per_s": tokens_per_s,
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "tflops_per_device": tflops_per_device,
        "mfu": tflops_per_device / peak_tflops if peak_tflops else None,
    }


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of metrics.jsonl; a torn last line (a killed writer) is skipped."""
    path = Path(run_dir) / METRICS_FILE
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


class MetricsLog:
    """Rank 0's sinks. Construct on rank 0 only."""

    def __init__(
        self,
        run_dir: Path,
        run_name: str,
        wandb_config: Any,
        run_config: dict[str, Any],
        wandb_run_id: str,
        resumed_step: int | None,
        total_steps: int,
    ) -> None:
        self.run_dir = run_dir
        self.total_steps = total_steps
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / METRICS_FILE
        kept = [r for r in read_metrics(run_dir) if resumed_step is not None and r.get("step", 0) <= resumed_step]
        # Rewrite atomically: records after the checkpoint belong to an attempt that was rolled back.
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.file = open(self.path, "a", buffering=1)
        self.wandb = None
        if wandb_config.mode != "disabled":
            import wandb

            self.wandb = wandb.init(
                mode=wandb_config.mode,
                project=wandb_config.project,
                entity=wandb_config.entity,
                name=wandb_config.name or run_name,
                tags=list(wandb_config.tags),
                dir=str(run_dir),
                id=wandb_run_id,
                resume="allow",
                config=run_config,
            )

    def log(self, record: dict[str, Any]) -> None:
        """record: {"kind": "train" | "eval", "step": N, ...}."""
        self.file.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            kind = record["kind"]
            values = {
                f"{kind}/{k}": v
                for k, v in record.items()
                if k not in ("kind", "step") and isinstance(v, (int, float)) and v is not None
            }
            self.wandb.log(values, step=record["step"])
        print(progress_line(record, self.total_steps), flush=True)

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in values.items() if v is not None})

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def progress_line(record: dict[str, Any], total_steps: int) -> str:
    step = record["step"]
    head = f"step {step:>{len(str(total_steps))}}/{total_steps}"
    if record["kind"] == "eval":
        return (
            f"{head} | eval | loss {record['loss']:.4f} | acc {record['accuracy']:.4f} "
            f"| {record['masked_tokens']:,} masked tokens | {record['seconds']:.1f}s"
        )
    parts = [head, f"loss {record['loss']:.4f}", f"acc {record['accuracy']:.4f}", f"lr {record['lr']:.2e}"]
    if record.get("grad_norm") is not None:
        parts.append(f"gnorm {record['grad_norm']:.3f}")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    parts.append(f"{record['samples_per_s']:,.1f} seq/s")
    parts.append(f"{record['tflops_per_device']:.2f} TFLOP/s/dev")
    if record.get("mfu") is not None:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    parts.append(f"mem {record['memory_gib']:.2f} GiB")
    if record.get("nonfinite_skipped"):
        parts.append(f"skipped {record['nonfinite_skipped']}")
    if record.get("eta_s") is not None:
        parts.append(f"eta {tqdm.format_interval(record['eta_s'])}")
    return " | ".join(parts)


def log_error(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last call (CUDA), else this process's resident memory."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


@dataclass
class Window:
    """Training-step work since the last log line (eval and checkpoint time excluded)."""

    steps: int = 0
    seconds: float = 0.0
    sums: torch.Tensor | None = None  # [loss sum, correct, masked tokens] of this rank
    grad_norm: float | None = None
    lr: float = 0.0

    def add(self, sums: torch.Tensor, grad_norm: Any, seconds: float, lr: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.sums = sums if self.sums is None else self.sums + sums
        self.grad_norm = grad_norm
        self.lr = lr


class TrainingMetrics:
    """The training side of the metrics: a window of steps between log lines, turned into one train record
    (loss and accuracy over every rank, throughput, MFU, memory, ETA) at each log line. Collective."""

    def __init__(
        self,
        every_steps: int,
        total_steps: int,
        tokens_per_step: int,
        global_batch: int,
        world_size: int,
        flops_per_token: float,
        peak_tflops: float | None,
        device: torch.device,
    ) -> None:
        self.every_steps, self.total_steps = every_steps, total_steps
        self.tokens_per_step, self.global_batch, self.world_size = tokens_per_step, global_batch, world_size
        self.flops_per_token, self.peak_tflops, self.device = flops_per_token, peak_tflops, device
        self.window = Window()

    def due(self, step: int) -> bool:
        """Whether the step that ends at `step` is logged (its gradient norm is then measured)."""
        return step % self.every_steps == 0 or step == self.total_steps

    def record(self, step: int, counters: dict[str, Any]) -> dict[str, Any]:
        """The train record for the window that ends at `step`; starts a new window."""
        window, self.window = self.window, Window()
        assert window.sums is not None, "a log line without a step"
        sums = window.sums.clone()
        dist.all_reduce(sums)
        loss_sum, correct, masked = sums.tolist()
        speed = throughput(
            window.steps * self.tokens_per_step,
            window.steps * self.global_batch,
            window.seconds,
            self.world_size,
            self.flops_per_token,
            self.peak_tflops,
        )
        return {
            "kind": "train",
            "step": step,
            "loss": loss_sum / max(masked, 1),
            "accuracy": correct / max(masked, 1),
            "lr": window.lr,
            "grad_norm": None if window.grad_norm is None else float(window.grad_norm),
            **speed,
            "memory_gib": memory_gib(self.device),
            "tokens": counters["tokens"],
            "epoch": counters["epoch"],
            "nonfinite_skipped": counters["nonfinite_skipped"],
            "skipped_steps": counters["skipped_steps"],
            "eta_s": (self.total_steps - step) * window.seconds / window.steps,
        }
