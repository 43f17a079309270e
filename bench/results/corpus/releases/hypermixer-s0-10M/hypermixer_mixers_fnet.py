# Generated from hypermixer/mixers/fnet.py by hypermixer.hf.release when this release was written; do not edit.
"""FNet token mixing: the real part of a 2-D Fourier transform over sequence and features (Lee-Thorp et al. 2022).

FNet cannot be padding-invariant: the DFT along the sequence has length N, so appending padding
changes every frequency and therefore every output, even with padded inputs zeroed.
"""

from __future__ import annotations

import torch
from torch import nn

from .hypermixer_config import EncoderConfig


class FourierMixing(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            x = x * mask.to(x.dtype)[:, :, None]
        # FFTs do not run in bf16/fp16 on every backend; compute in fp32 and cast back.
        return torch.fft.fft2(x.float(), dim=(-2, -1)).real.to(x.dtype)
