"""AdamW parameter groups and the learning-rate schedule, shared by pretraining and fine-tuning.

One warmup semantics: optimizer step `s` (0-based) of a `w`-step warmup runs at peak x (s + 1) / w, so
the first step already moves the weights and step w - 1 reaches the peak; then the decay runs from the
peak at step w to `min_ratio` x peak at step `total` (linear or cosine), or stays (constant)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

DECAYS = ("linear", "cosine", "constant")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups as BERT has them: weight decay on weight matrices and embeddings only, not on biases
    (the hypernetworks' `fc*_bias` included) nor LayerNorm parameters. A tied parameter goes in once."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.requires_grad and id(param) not in seen:
                seen.add(id(param))
                exempt = isinstance(module, nn.LayerNorm) or name.endswith("bias")
                (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup: int, total: int, decay: str = "linear", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if decay == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_ratio) * progress


def lr_scheduler(
    optimizer: Optimizer, warmup: int, total: int, decay: str = "linear", min_ratio: float = 0.0
) -> LambdaLR:
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {decay!r}")
    return LambdaLR(optimizer, partial(lr_factor, warmup=warmup, total=total, decay=decay, min_ratio=min_ratio))
