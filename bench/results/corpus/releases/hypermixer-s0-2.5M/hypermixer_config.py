# Generated from hypermixer/config.py by hypermixer.hf.release when this release was written; do not edit.
"""The encoder's configuration: one dataclass, checked completely on construction, with named presets.

Each field's type (a `Literal` for a choice) and bounds (`metadata`: gt / ge / lt, pydantic's names) are
declared once, here: `EncoderConfig` checks them itself (torch and safetensors are all a release needs),
and the pretraining config's typed `model` section is built from the same declarations (pretrain/config.py),
so a mistake in `model.*` is reported with every other mistake of the config.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

Mixer = Literal["hypermixer", "transformer", "mlpmixer", "fnet"]
HypermixerPosition = Literal["sinusoidal", "learned", "none"]
EmbeddingPosition = Literal["learned", "none"]
Pooling = Literal["mean", "cls"]
NormPosition = Literal["pre", "post"]
MIXERS, HYPERMIXER_POSITIONS = typing.get_args(Mixer), typing.get_args(HypermixerPosition)
EMBEDDING_POSITIONS, POOLINGS, NORM_POSITIONS = (
    typing.get_args(EmbeddingPosition),
    typing.get_args(Pooling),
    typing.get_args(NormPosition),
)
POSITIVE = {"gt": 0}
# Sizes that default (None) to another field's value.
DERIVED_FROM = {
    "hypermixer_hypernet_hidden_size": "hidden_size",
    "hypermixer_token_mixing_size": "hidden_size",
    "mlpmixer_token_mixing_size": "max_seq_len",
}
BOUNDS = {"gt": ">", "ge": ">=", "lt": "<"}


class EncoderConfigError(ValueError):
    """Every mistake in an encoder config; `problems` holds one "field: what is wrong" line per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(f"EncoderConfig.{p}" for p in self.problems))


@dataclass
class EncoderConfig:
    """Everything that defines an encoder's shape. Mixer-specific fields are ignored by other mixers."""

    vocab_size: int = field(default=30522, metadata=POSITIVE)
    hidden_size: int = field(default=768, metadata=POSITIVE)
    num_layers: int = field(default=12, metadata=POSITIVE)
    num_heads: int = field(default=12, metadata=POSITIVE)
    intermediate_size: int = field(default=3072, metadata=POSITIVE)  # feature-mixing MLP width
    mixer: Mixer = "hypermixer"
    max_seq_len: int = field(default=512, metadata=POSITIVE)
    # segment embeddings for sentence pairs; 0 disables them
    type_vocab_size: int = field(default=2, metadata={"ge": 0})
    position_embedding: EmbeddingPosition = "learned"  # added to token embeddings, identical for every mixer
    # LayerNorm on the summed embeddings, as BERT has. Without it the pre-LN residual stream starts at the
    # embeddings' std 0.02 and our transformer sat on the unigram plateau (docs/pretrain.md#quality).
    embedding_layer_norm: bool = True
    # Where each block's LayerNorms sit. "pre": x + f(norm(x)), and a final LayerNorm after the last block
    # (stable at high learning rates, Cramming's choice). "post": norm(x + f(x)), no final LayerNorm, as
    # BERT has: our transformer with "post" is the HF BERT reference's layout (docs/pretrain.md#quality).
    norm_position: NormPosition = "pre"
    dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    # transformer only; > 0 puts torch's CPU attention on its math path (N x N stored)
    attention_dropout: float = field(default=0.1, metadata={"ge": 0, "lt": 1})
    layer_norm_eps: float = field(default=1e-5, metadata=POSITIVE)
    initializer_range: float = field(default=0.02, metadata=POSITIVE)
    pad_token_id: int = field(default=0, metadata={"ge": 0})
    # HyperMixing: W1 = h1(X + P), W2 = h2(X + P); h: d/H -> hypernet_hidden/H -> token_mixing/H per head.
    hypermixer_tied: bool = False
    hypermixer_position: HypermixerPosition = "sinusoidal"
    hypermixer_hypernet_hidden_size: int | None = field(default=None, metadata=POSITIVE)  # None: hidden_size
    # d', total over heads; None: hidden_size
    hypermixer_token_mixing_size: int | None = field(default=None, metadata=POSITIVE)
    hypermixer_layer_norm: bool = True  # LayerNorm on the token mixer's output
    # MLP-Mixer: a static token-mixing MLP over max_seq_len positions.
    mlpmixer_token_mixing_size: int | None = field(default=None, metadata=POSITIVE)  # None: max_seq_len
    # Classification head
    pooling: Pooling = "mean"
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes (e.g. tokenizer hash)

    def __post_init__(self) -> None:
        derived = {name for name in DERIVED_FROM if getattr(self, name) is None}  # a mistake there is its source's
        for name in derived:
            setattr(self, name, getattr(self, DERIVED_FROM[name]))
        found = [p for p in self.field_problems() if p.split(":")[0] not in derived]
        found += self.cross_problems(flagged={p.split(":")[0] for p in found} | derived)
        if found:
            raise EncoderConfigError(found)

    def field_problems(self) -> list[str]:
        """Each field against its own type and bounds, one line per mistake."""
        hints = typing.get_type_hints(EncoderConfig)
        out = []
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            choices = typing.get_args(kind) if typing.get_origin(kind) is Literal else ()
            real = float in (kind, *typing.get_args(kind))
            if choices and value not in choices:
                out.append(f"{f.name}: must be one of {', '.join(choices)}, got {value!r}")
            elif f.metadata and (isinstance(value, bool) or not isinstance(value, (int, float) if real else int)):
                out.append(f"{f.name}: expected {'a number' if real else 'an integer'}, got {value!r}")
            elif f.metadata:
                out += [
                    f"{f.name}: must be {BOUNDS[bound]} {limit}, got {value!r}"
                    for bound, limit in f.metadata.items()
                    if not {"gt": value > limit, "ge": value >= limit, "lt": value < limit}[bound]
                ]
        return out

    def cross_problems(self, flagged: set[str] | frozenset[str] = frozenset()) -> list[str]:
        """Checks across fields whose own values are right (not in `flagged`); each line starts with its field."""
        out = []
        heads = self.num_heads
        for name in ("hidden_size", "hypermixer_hypernet_hidden_size", "hypermixer_token_mixing_size"):
            size = getattr(self, name)
            if flagged & {name, "num_heads"} or not size % heads:
                continue
            first, second = ("num_heads", name) if name == "hidden_size" else (name, "num_heads")
            out.append(f"{first}: {name} ({size}) must be divisible by num_heads ({heads}); change {first} or {second}")
        if not flagged & {"pad_token_id", "vocab_size"} and self.pad_token_id >= self.vocab_size:
            out.append(f"pad_token_id: {self.pad_token_id} must be < vocab_size ({self.vocab_size})")
        return out

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


# `base` is BERT-base's width and depth; `small` is BERT-small's; `tiny` trains in minutes on a CPU.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=512, max_seq_len=128),
    "small": dict(hidden_size=512, num_layers=4, num_heads=8, intermediate_size=2048, max_seq_len=512),
    "base": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, max_seq_len=512),
}
