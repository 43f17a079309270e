# Generated from hypermixer/mixers/attention.py by hypermixer.hf.release when this release was written; do not edit.
"""Multi-head self-attention (the Transformer baseline), through scaled_dot_product_attention."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hypermixer_config import EncoderConfig


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_size = config.head_size
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.out = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_dropout = config.attention_dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        # Key padding mask, broadcast over heads and queries: True = may attend.
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attention_dropout if self.training else 0.0
        )
        return self.out(y.transpose(1, 2).reshape(batch, length, width))
