"""Evaluation: masked-LM loss and accuracy on the validation split, summed over every rank."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from pretrain.config import Resolved
from pretrain.data import Masking, validation_batches, validation_samples


def masked_lm_sums(
    forward: Callable[..., Any], batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """[sum of per-token loss, correct predictions, masked tokens] over batches (float64)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = forward(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = torch.as_tensor(out.num_masked, dtype=torch.float64, device=device)
            sums += torch.stack([out.loss.double() * n, out.accuracy.double() * n, n])
    return sums


class Evaluator:
    """Every `eval.every_steps` and at the last step; collective. Each rank reads its own share of the split."""

    def __init__(self, resolved: Resolved, masking: Masking, rank: int, device: torch.device) -> None:
        config = resolved.config
        self.resolved, self.masking, self.rank, self.device = resolved, masking, rank, device
        self.micro_batch = config.eval.micro_batch_size or config.batch.micro_batch_size
        self.per_rank = validation_samples(
            resolved.validation_manifest, config.data.validation_split, resolved.world_size, config.eval.max_samples
        )
        if self.per_rank == 0 and rank == 0:
            warnings.warn(
                f"the validation split {config.data.validation_split!r} has fewer sequences than ranks: no evaluation",
                stacklevel=1,
            )

    def due(self, step: int) -> bool:
        every = self.resolved.config.eval.every_steps
        return bool(self.per_rank) and (bool(every and step % every == 0) or step == self.resolved.total_steps)

    def __call__(self, engine: Any, step: int) -> dict[str, Any]:
        """The eval record at `step` (without the run's token and time counters)."""
        config = self.resolved.config
        began = time.perf_counter()
        batches = validation_batches(
            self.resolved.validation_manifest,
            config.data.validation_split,
            self.masking,
            config.seed,
            self.rank,
            self.resolved.world_size,
            self.micro_batch,
            config.eval.max_samples,
        )
        engine.eval()
        sums = masked_lm_sums(engine, batches, self.device)
        engine.train()
        dist.all_reduce(sums)
        loss_sum, correct, masked = sums.tolist()
        return {
            "kind": "eval",
            "step": step,
            "loss": loss_sum / max(masked, 1),
            "accuracy": correct / max(masked, 1),
            "masked_tokens": int(masked),
            "seconds": time.perf_counter() - began,
        }
