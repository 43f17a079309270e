# Generated from hypermixer/mixers/mlpmixer.py by hypermixer.hf.release when this release was written; do not edit.
"""MLP-Mixer token mixing: one static MLP across positions, shared by all features (Tolstikhin et al. 2021).

The MLP is defined over max_seq_len positions. A shorter input is treated as padded to max_seq_len with
zeros, which is the same as using only the first N columns of the first layer and the first N rows of
the second: so we slice the weights instead of padding. Masked positions are zeroed first, which
makes real positions' outputs independent of appended padding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hypermixer_config import EncoderConfig


class MLPMixing(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.max_seq_len = config.max_seq_len
        mixing = config.mlpmixer_token_mixing_size or config.max_seq_len  # None: max_seq_len (EncoderConfig)
        self.fc1 = nn.Linear(config.max_seq_len, mixing)
        self.fc2 = nn.Linear(mixing, config.max_seq_len)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        length = x.shape[1]
        if length > self.max_seq_len:
            raise ValueError(f"MLPMixing: sequence length {length} exceeds max_seq_len {self.max_seq_len}")
        if mask is not None:
            x = x * mask.to(x.dtype)[:, :, None]
        tokens = x.transpose(1, 2)  # (B, d, N): mix along N for every feature
        hidden = F.gelu(F.linear(tokens, self.fc1.weight[:, :length], self.fc1.bias))
        out = F.linear(hidden, self.fc2.weight[:length], self.fc2.bias[:length])
        return out.transpose(1, 2)
