"""Token mixers, one per file. Each maps (x: (B, N, d), mask: (B, N) or None) -> (B, N, d)."""

from __future__ import annotations

from torch import nn

from hypermixer.config import EncoderConfig
from hypermixer.mixers.attention import SelfAttention
from hypermixer.mixers.fnet import FourierMixing
from hypermixer.mixers.hypermixing import HyperMixing
from hypermixer.mixers.mlpmixer import MLPMixing

MIXER_CLASSES: dict[str, type[nn.Module]] = {
    "hypermixer": HyperMixing,
    "transformer": SelfAttention,
    "mlpmixer": MLPMixing,
    "fnet": FourierMixing,
}


def build_mixer(config: EncoderConfig) -> nn.Module:
    return MIXER_CLASSES[config.mixer](config)


__all__ = ["HyperMixing", "SelfAttention", "MLPMixing", "FourierMixing", "MIXER_CLASSES", "build_mixer"]
