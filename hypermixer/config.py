"""The encoder's configuration: one dataclass, validated on construction, with named presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

MIXERS = ("hypermixer", "transformer", "mlpmixer", "fnet")
HYPERMIXER_POSITIONS = ("sinusoidal", "learned", "none")
EMBEDDING_POSITIONS = ("learned", "none")
POOLINGS = ("mean", "cls")
NORM_POSITIONS = ("pre", "post")


@dataclass
class EncoderConfig:
    """Everything that defines an encoder's shape. Mixer-specific fields are ignored by other mixers."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072  # feature-mixing MLP width
    mixer: str = "hypermixer"
    max_seq_len: int = 512
    type_vocab_size: int = 2  # segment embeddings for sentence pairs; 0 disables them
    position_embedding: str = "learned"  # added to token embeddings, identical for every mixer
    # LayerNorm on the summed embeddings, as BERT has. Without it the pre-LN residual stream starts at the
    # embeddings' std 0.02 and our transformer sat on the unigram plateau (docs/pretrain.md#quality).
    embedding_layer_norm: bool = True
    # Where each block's LayerNorms sit. "pre": x + f(norm(x)), and a final LayerNorm after the last block
    # (stable at high learning rates, Cramming's choice). "post": norm(x + f(x)), no final LayerNorm, as
    # BERT has: our transformer with "post" is the HF BERT reference's layout (docs/pretrain.md#quality).
    norm_position: str = "pre"
    dropout: float = 0.1
    attention_dropout: float = 0.1  # transformer only; > 0 puts torch's CPU attention on its math path (N x N stored)
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    pad_token_id: int = 0
    # HyperMixing: W1 = h1(X + P), W2 = h2(X + P); h: d/H -> hypernet_hidden/H -> token_mixing/H per head.
    hypermixer_tied: bool = False
    hypermixer_position: str = "sinusoidal"
    hypermixer_hypernet_hidden_size: int | None = None  # None: hidden_size
    hypermixer_token_mixing_size: int | None = None  # d', total over heads; None: hidden_size
    hypermixer_layer_norm: bool = True  # LayerNorm on the token mixer's output
    # MLP-Mixer: a static token-mixing MLP over max_seq_len positions.
    mlpmixer_token_mixing_size: int | None = None  # None: max_seq_len
    # Classification head
    pooling: str = "mean"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. tokenizer hash)

    def __post_init__(self) -> None:
        if self.hypermixer_hypernet_hidden_size is None:
            self.hypermixer_hypernet_hidden_size = self.hidden_size
        if self.hypermixer_token_mixing_size is None:
            self.hypermixer_token_mixing_size = self.hidden_size
        if self.mlpmixer_token_mixing_size is None:
            self.mlpmixer_token_mixing_size = self.max_seq_len
        self._validate()

    def _validate(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "intermediate_size",
            "max_seq_len",
            "hypermixer_hypernet_hidden_size",
            "hypermixer_token_mixing_size",
            "mlpmixer_token_mixing_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")
        if (
            isinstance(self.type_vocab_size, bool)
            or not isinstance(self.type_vocab_size, int)
            or self.type_vocab_size < 0
        ):
            raise ValueError(f"EncoderConfig.type_vocab_size must be an integer >= 0, got {self.type_vocab_size!r}")
        _check_choice("mixer", self.mixer, MIXERS)
        _check_choice("position_embedding", self.position_embedding, EMBEDDING_POSITIONS)
        _check_choice("hypermixer_position", self.hypermixer_position, HYPERMIXER_POSITIONS)
        _check_choice("pooling", self.pooling, POOLINGS)
        _check_choice("norm_position", self.norm_position, NORM_POSITIONS)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"EncoderConfig.num_heads ({self.num_heads}) must divide hidden_size ({self.hidden_size})")
        for name in ("hypermixer_hypernet_hidden_size", "hypermixer_token_mixing_size"):
            if getattr(self, name) % self.num_heads:
                raise ValueError(
                    f"EncoderConfig.{name} ({getattr(self, name)}) must be divisible by num_heads ({self.num_heads})"
                )
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"EncoderConfig.{name} must be in [0, 1), got {value!r}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"EncoderConfig.pad_token_id ({self.pad_token_id}) must be in [0, vocab_size)")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise ValueError("EncoderConfig.layer_norm_eps and initializer_range must be positive")

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> EncoderConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                raise ValueError(f"EncoderConfig: unknown key {key!r} (known keys: {', '.join(sorted(known))})")
        return cls(**values)

    @classmethod
    def from_saved(cls, values: dict[str, Any]) -> EncoderConfig:
        """A dict that to_dict() wrote, possibly by an older version: keys added since then take the
        value that reproduces the model it saved."""
        return cls.from_dict({**SAVED_BEFORE_THE_KEY_EXISTED, **values})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EncoderConfig:
        if name not in PRESETS:
            raise ValueError(f"EncoderConfig: unknown preset {name!r} (choose from {', '.join(PRESETS)})")
        return cls.from_dict({**PRESETS[name], **overrides})

    def replace(self, **changes: Any) -> EncoderConfig:
        return EncoderConfig.from_dict({**self.to_dict(), **changes})


# Fields added after releases were first written, with the behaviour those releases have.
SAVED_BEFORE_THE_KEY_EXISTED: dict[str, Any] = {"embedding_layer_norm": False}


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"EncoderConfig.{name} must be one of {', '.join(choices)}, got {value!r}")


# `base` is BERT-base's width and depth; `small` is BERT-small's; `tiny` trains in minutes on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512, max_seq_len=128),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, max_seq_len=512),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_seq_len=512),
}
