# Generated from hypermixer/mixers/__init__.py by hypermixer.hf.release when this release was written; do not edit.
"""Token mixers, one per file. Each maps (x: (B, N, d), mask: (B, N) or None) -> (B, N, d)."""

from __future__ import annotations

from torch import nn

from .hypermixer_config import EncoderConfig
from .hypermixer_mixers_attention import SelfAttention
from .hypermixer_mixers_fnet import FourierMixing
from .hypermixer_mixers_hypermixing import HyperMixing
from .hypermixer_mixers_mlpmixer import MLPMixing

MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "hypermixer": HyperMixing,
    "transformer": SelfAttention,
    "mlpmixer": MLPMixing,
    "fnet": FourierMixing,
}


def build_mixer(config: EncoderConfig) -> nn.Module:
    return MIXER_CLASSES[config.mixer](config)


__all__ = ["HyperMixing", "SelfAttention", "MLPMixing", "FourierMixing", "MIXER_CLASSES", "build_mixer"]
