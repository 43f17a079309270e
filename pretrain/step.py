"""The one training step on a DeepSpeed engine: `grad_accum` micro-batches -> one optimizer update.

No host read per micro-batch. The loss, its finiteness and the step's statistics stay on the device;
the host reads the device once per step, after the last forward and before its backward: one small
all-reduce (MAX) of [non-finite flag of each micro-batch, stop signal] and `.tolist()` of it. One more
collective per step sums the step's masked-token count over ranks; it is counted on the host copies of
the labels and reduced asynchronously, overlapping the first forward.

The loss of a step is the mean over all of its masked tokens: every micro-batch backpropagates its
loss *sum* scaled by (grad_accum x world size) / (masked tokens of the step on all ranks), which
DeepSpeed's division by grad_accum and average over ranks turn into sum / total. So 1 rank x 4
accumulation steps, 2 ranks x 2 and 1 rank x one big batch give the same update.

Non-finite losses: a step in which some micro-batch on some rank had a non-finite loss is dropped as a
whole: the gradients accumulated since the last update are discarded (the bad micro-batch's backward
never runs: the flags are read before the last backward, and a bad earlier micro-batch's gradients are
thrown away with the rest), the optimizer and the lr schedule do not move, and the step is redone with
fresh micro-batches. Each non-finite micro-batch is counted and warned about in order, as before;
`max_nonfinite_in_a_row` of them in a row (across dropped steps) abort the run.
A stop signal seen on any rank at a step's read makes every rank finish that step and return stop=True.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hypermixer import IGNORE_INDEX


class NonFiniteLossError(RuntimeError):
    """Too many non-finite losses in a row: the run diverged."""


@dataclass
class StepResult:
    sums: torch.Tensor  # [loss sum, correct, masked] over the step's applied micro-batches, this rank (device)
    dropped: int  # micro-batches dropped for a non-finite loss (on some rank)
    stop: bool  # some rank got a stop signal
    grad_norm: float | torch.Tensor | None  # read (float()) only at log time


@dataclass
class NonFiniteGuard:
    limit: int
    in_a_row: int = 0
    total: int = 0

    def record(self, flags: list[float], rank: int) -> int:
        """Count the step's non-finite micro-batches in order; raise at `limit` in a row. Returns how many."""
        bad = 0
        for flag in flags:
            if not flag:
                self.in_a_row = 0
                continue
            bad += 1
            self.in_a_row += 1
            self.total += 1
            if rank == 0:
                print(
                    f"warning: non-finite loss on some rank: micro-batch dropped before the update "
                    f"({self.in_a_row} in a row, {self.total} in total; the run aborts at {self.limit} in a row)",
                    file=sys.stderr,
                    flush=True,
                )
            if self.in_a_row >= self.limit:
                raise NonFiniteLossError(
                    f"{self.in_a_row} non-finite losses in a row: the run diverged "
                    "(lower optim.lr, raise optim.warmup_steps, or check the data)"
                )
        return bad


def step_targets(micro_batches: list[dict[str, torch.Tensor]], slots: int | None) -> torch.Tensor:
    """Masked tokens the step's losses cover on this rank, from the host labels (capped at `slots` a row)."""
    per_row = (torch.stack([b["labels"] for b in micro_batches]) != IGNORE_INDEX).sum(dim=-1)
    return (per_row.clamp(max=slots) if slots else per_row).sum()


def discard_gradients(engine: Any) -> None:
    """Throw away every gradient accumulated since the last update, in each of DeepSpeed's optimizers,
    the way their own overflow handling does, and rewind the engine to the start of a step."""
    optimizer = engine.optimizer
    if (
        hasattr(optimizer, "averaged_gradients")
        and isinstance(optimizer.averaged_gradients, dict)
        and hasattr(optimizer, "all_grad_tensors")
    ):  # ZeRO 1 and 2
        optimizer.zero_grad(set_to_none=True)
        if hasattr(optimizer, "_release_preflattened_grad_buffers"):
            optimizer._release_preflattened_grad_buffers()
        if getattr(optimizer, "cpu_offload", False):
            optimizer.reset_cpu_buffers()
        else:
            for store in (optimizer.averaged_gradients, optimizer.all_grad_tensors):  # filled at different times
                for key in list(store):
                    store[key] = None
        optimizer.micro_step_id = -1  # INITIAL_MICRO_STEP_ID: the next backward starts a fresh accumulation
    elif hasattr(optimizer, "_overflow_clean_up"):  # ZeRO 3
        optimizer._overflow_clean_up(getattr(optimizer, "loss_scale", 1.0))
    elif hasattr(optimizer, "clear_hp_grads"):  # bf16 without ZeRO
        optimizer.clear_hp_grads()
        optimizer.clear_lp_grads()
    elif hasattr(optimizer, "zero_grad"):
        optimizer.zero_grad(set_to_none=True)
    engine.zero_grad()


def train_step(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    device: torch.device,
    guard: NonFiniteGuard,
    stop_requested: Callable[[], bool],
    grad_accum: int,
    norm_by_hand: bool,
    rank: int,
    world_size: int = 1,
    slots: int | None = None,
    want_norm: bool = True,
) -> StepResult:
    """One optimizer update. slots: the model's static prediction slots per sequence (None: it has none).
    norm_by_hand: measure the gradient norm here (ZeRO-0 fp32 keeps none); want_norm: return a norm."""
    dropped = 0
    while True:
        micro = [next(batches) for _ in range(grad_accum)]
        total = step_targets(micro, slots).to(device=device, dtype=torch.float32)
        pending = dist.all_reduce(total, async_op=True)
        flags = torch.zeros(grad_accum + 1, device=device)  # non-finite per micro-batch, then stop
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        scale = None
        for i, batch in enumerate(micro):
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            out = engine(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            count = torch.as_tensor(out.num_masked, device=device)
            loss_sum = out.loss * count.to(out.loss.dtype)
            flags[i] = (~torch.isfinite(loss_sum.detach())).float()
            sums += torch.stack(
                [loss_sum.detach().double(), out.accuracy.detach().double() * count.double(), count.double()]
            )
            if scale is None:
                pending.wait()
                scale = (grad_accum * world_size) / total.clamp(min=1.0)
            if i == grad_accum - 1:
                flags[-1] = 1.0 if stop_requested() else 0.0
                dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                read = flags.tolist()  # the step's one host read
                stop = bool(read[-1])
                bad = guard.record(read[:-1], rank)
                if bad:
                    dropped += bad
                    del out, loss_sum
                    discard_gradients(engine)
                    engine.micro_steps -= grad_accum - 1  # the next micro-batch opens a step again
                    break
            engine.backward(loss_sum * scale.to(loss_sum.dtype))
            grad_norm = None
            if norm_by_hand and want_norm and engine.is_gradient_accumulation_boundary():
                # Stage 0 in fp32 keeps no norm: measure the all-reduced gradients before the update.
                grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                grad_norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=device)
            engine.step()
        else:
            if grad_norm is None and want_norm:
                grad_norm = engine.get_global_grad_norm()
            return StepResult(sums, dropped, stop, grad_norm)
