"""Fine-tuning beyond a release's pretraining length: its position-dependent weights extended.

Positions enter an encoder in two places: the learned position embeddings added to the token
embeddings (`position_embedding="learned"`), and, in HyperMixing with `hypermixer_position="learned"`,
each layer's position table added to the hypernetworks' input (sinusoidal positions, HyperMixing's
default, have no length limit). Both are (max_seq_len x d) tables, extended here the same way:

- copy: the table is repeated (position i takes the row of i mod the old length), so the first
  positions keep their pretrained values (Longformer's way of extending RoBERTa's 512 positions);
- interpolate: the table is stretched linearly along the positions (first and last rows kept).

MLP-Mixer's token-mixing weights are sized by max_seq_len themselves: there is no table to extend.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import FinetuneError
from hypermixer.mixers.hypermixing import HyperMixing

EXTENSIONS = ("copy", "interpolate")


def extend_positions(model: Any, length: int, how: str) -> list[str]:
    """Extend a classifier (or masked LM) in place to `length` positions; returns the names of the
    tables extended. The model's config says the new max_seq_len, so a saved model reloads at it.
    `model`: a hypermixer ForSequenceClassification or ForMaskedLM (`.config`, `.encoder`)."""
    config = model.config
    if how not in EXTENSIONS:
        raise FinetuneError(f"extend_positions: {how!r} is not one of {', '.join(EXTENSIONS)}")
    if length <= config.max_seq_len:
        return []
    if config.mixer == "mlpmixer":
        raise FinetuneError(
            f"mlpmixer's token-mixing weights are sized by its max_seq_len {config.max_seq_len}; "
            f"it cannot be extended to {length} (fine-tune it at {config.max_seq_len} or less)"
        )
    extended = []
    embeddings = model.encoder.embeddings
    if embeddings.position is not None:
        table = stretch(embeddings.position.weight.detach(), length, how)
        embeddings.position = nn.Embedding.from_pretrained(table, freeze=False)
        extended.append("encoder.embeddings.position.weight")
    for number, block in enumerate(model.encoder.blocks):
        mixer = block.mixer
        if isinstance(mixer, HyperMixing) and mixer.position == "learned":
            mixer.position_table = nn.Parameter(stretch(mixer.position_table.detach(), length, how))
            extended.append(f"encoder.blocks.{number}.mixer.position_table")
    model.config = model.encoder.config = config.replace(max_seq_len=length)
    return extended


def stretch(table: torch.Tensor, length: int, how: str) -> torch.Tensor:
    """A (positions x d) table made `length` rows long, by copying or linear interpolation."""
    if how == "copy":
        return table.repeat(math.ceil(length / table.shape[0]), 1)[:length].clone()
    grown = F.interpolate(table.T[None].float(), size=length, mode="linear", align_corners=True)
    return grown[0].T.contiguous().to(table.dtype)
