"""HyperMixer encoders and their baselines. Depends on torch and safetensors only."""

from hypermixer.config import PRESETS, EncoderConfig
from hypermixer.encoder import Encoder
from hypermixer.flops import flops_per_token, forward_flops_per_token, mixer_forward_flops_per_token
from hypermixer.heads import (
    IGNORE_INDEX,
    ClassifierOutput,
    ForMaskedLM,
    ForSequenceClassification,
    MaskedLMOutput,
    max_predictions_per_seq,
)
from hypermixer.io import read_release_config
from hypermixer.mixers import MIXER_CLASSES, FourierMixing, HyperMixing, MLPMixing, SelfAttention

MIXERS = tuple(MIXER_CLASSES)

__all__ = [
    "EncoderConfig",
    "PRESETS",
    "MIXERS",
    "Encoder",
    "ForMaskedLM",
    "ForSequenceClassification",
    "MaskedLMOutput",
    "ClassifierOutput",
    "IGNORE_INDEX",
    "HyperMixing",
    "SelfAttention",
    "MLPMixing",
    "FourierMixing",
    "flops_per_token",
    "forward_flops_per_token",
    "mixer_forward_flops_per_token",
    "read_release_config",
    "max_predictions_per_seq",
]
