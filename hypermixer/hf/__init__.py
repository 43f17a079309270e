"""Hugging Face transformers glue: a release folder loads with the Auto classes and `trust_remote_code=True`.

`hypermixer.hf.release` (no transformers import) holds what `save_pretrained` writes for Hugging Face:
the config.json keys, the release's code files (generated from this package's own source at save
time) and the tokenizer side files. `configuration_hypermixer` and `modeling_hypermixer` import
transformers; they are what a release's `auto_map` names, and they load only when asked for:

    from hypermixer.hf import HyperMixerForMaskedLM   # imports transformers (the `hf` extra)
"""

from __future__ import annotations

_LAZY = {
    "HyperMixerConfig": "configuration_hypermixer",
    "HyperMixerModel": "modeling_hypermixer",
    "HyperMixerForMaskedLM": "modeling_hypermixer",
    "HyperMixerForSequenceClassification": "modeling_hypermixer",
    "HyperMixerPreTrainedModel": "modeling_hypermixer",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = list(_LAZY)
