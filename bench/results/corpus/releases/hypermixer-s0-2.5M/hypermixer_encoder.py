# Generated from hypermixer/encoder.py by hypermixer.hf.release when this release was written; do not edit.
"""The encoder shared by every mixer: embeddings, N residual blocks (pre-norm and a final norm by default).

Only the token mixer differs between `hypermixer`, `transformer`, `mlpmixer` and `fnet`, so that a
comparison between them isolates the mixer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .hypermixer_config import EncoderConfig
from .hypermixer_mixers import build_mixer


class Embeddings(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.token = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = (
            nn.Embedding(config.max_seq_len, config.hidden_size) if config.position_embedding == "learned" else None
        )
        self.segment = nn.Embedding(config.type_vocab_size, config.hidden_size) if config.type_vocab_size else None
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.embedding_layer_norm else None
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token(input_ids)
        if self.position is not None:
            length = input_ids.shape[1]
            if length > self.position.num_embeddings:
                raise ValueError(
                    f"Encoder: sequence length {length} exceeds max_seq_len {self.position.num_embeddings}"
                )
            x = x + self.position.weight[:length]
        if self.segment is not None:
            # No segment ids means one segment: segment 0, as BERT does, so MLM pretraining trains it.
            x = x + (self.segment.weight[0] if token_type_ids is None else self.segment(token_type_ids))
        if self.norm is not None:
            x = self.norm(x)
        return self.dropout(x)


class FeedForward(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Residual block. Pre-norm: x + mix(norm(x)), then x + mlp(norm(x)). Post-norm (BERT's layout):
    norm(x + mix(x)), then norm(x + mlp(x))."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.post_norm = config.norm_position == "post"
        self.mixer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mixer = build_mixer(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.post_norm:
            x = self.mixer_norm(x + self.dropout(self.mixer(x, mask)))
            return self.mlp_norm(x + self.dropout(self.mlp(x)))
        x = x + self.dropout(self.mixer(self.mixer_norm(x), mask))
        return x + self.dropout(self.mlp(self.mlp_norm(x)))


class Encoder(nn.Module):
    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        # Post-norm blocks already end in a LayerNorm.
        self.final_norm = (
            nn.Identity()
            if config.norm_position == "post"
            else nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        )
        self.gradient_checkpointing = False  # recompute each block in backward to save activation memory

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: (B, N); attention_mask: (B, N), 1 at real tokens, 0 at padding. Returns (B, N, d)."""
        x = self.embeddings(input_ids, token_type_ids)
        mask = None if attention_mask is None else attention_mask.bool()
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, mask, use_reentrant=False)
            else:
                x = block(x, mask)
        return self.final_norm(x)


def init_weights(module: nn.Module, config: EncoderConfig) -> None:
    """BERT's initialisation for Linear/Embedding/LayerNorm; the hypernetworks keep their own."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=config.initializer_range)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=config.initializer_range)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
