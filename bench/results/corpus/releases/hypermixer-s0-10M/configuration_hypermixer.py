# Generated from hypermixer/hf/configuration_hypermixer.py by hypermixer.hf.release when this release was written; do not edit.
"""HyperMixerConfig: the Hugging Face configuration of a hypermixer release (model_type "hypermixer").

At run time the EncoderConfig fields are flat attributes (`config.hidden_size`, `config.mixer`, ...;
`num_hidden_layers`, `num_attention_heads` and `max_position_embeddings` are aliases of `num_layers`,
`num_heads` and `max_seq_len`), so Hugging Face's tools and `from_pretrained(..., dropout=0.0)` work
as usual. On disk the config is the release's own config.json: hypermixer's keys (`format_version`,
`architecture`, `encoder`, `head`) next to Hugging Face's, so that both worlds read what the other wrote.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PretrainedConfig

from .hypermixer_config import EncoderConfig
from .hypermixer_hf_release import AUTO_MAP, HF_CLASSES, HF_FIELD_NAMES, MODEL_TYPE
from .hypermixer_io import FORMAT_VERSION, check_format_version, release_config

ENCODER_FIELDS = tuple(f.name for f in dataclasses.fields(EncoderConfig))
_LIBRARY_CLASSES = {hf: library for library, hf in HF_CLASSES.items()}
_OWN_KEYS = ("format_version", "architecture", "encoder", "head")


class HyperMixerConfig(PretrainedConfig):
    model_type = MODEL_TYPE
    attribute_map = {hf: field for hf, field in HF_FIELD_NAMES.items() if hf != field}

    def __init__(
        self,
        encoder: dict[str, Any] | None = None,
        head: dict[str, Any] | None = None,
        format_version: int = FORMAT_VERSION,
        architecture: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_format_version(format_version, "config.json")
        # Flat fields (HF names or EncoderConfig names) fill in what `encoder` does not give; where both
        # give a value they must agree.
        values = dict(encoder or {})
        for name in list(kwargs):
            field = self.attribute_map.get(name, name)
            if field not in ENCODER_FIELDS:
                continue
            value = kwargs.pop(name)
            if field in values and values[field] != value:
                raise ValueError(f"config.json: {name} is {value!r} but encoder.{field} is {values[field]!r}")
            values[field] = value
        for field, value in EncoderConfig.from_dict(values).to_dict().items():  # validated, defaults filled
            setattr(self, field, value)
        self.architecture = architecture
        head = dict(head or {})
        if "num_labels" in head and "id2label" not in kwargs and "num_labels" not in kwargs:
            kwargs["num_labels"] = int(head["num_labels"])
        super().__init__(**kwargs)

    def encoder_config(self) -> EncoderConfig:
        """The library's EncoderConfig for the current values (validated)."""
        return EncoderConfig.from_dict({field: getattr(self, field) for field in ENCODER_FIELDS})

    def library_architecture(self) -> str:
        """The library's class for this config: from `architectures` (set by save_pretrained), else as read."""
        for name in self.architectures or ():
            if name in _LIBRARY_CLASSES:
                return _LIBRARY_CLASSES[name]
        return self.architecture or "Encoder"

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ENCODER_FIELDS + _OWN_KEYS:
            out.pop(key, None)
        architecture = self.library_architecture()
        head = {"num_labels": self.num_labels} if architecture == "ForSequenceClassification" else {}
        own = release_config(architecture, self.encoder_config().to_dict(), head)
        # Hugging Face's own values (labels, problem_type, architectures, ...) win over those derived here.
        for key in ("id2label", "label2id", "problem_type"):
            if out.get(key) is not None:
                own.pop(key, None)
        own["auto_map"] = {**(out.pop("auto_map", None) or {}), **AUTO_MAP}
        return {**own, **{key: value for key, value in out.items() if value is not None or key not in own}}


__all__ = ["HyperMixerConfig"]
