# Generated from hypermixer/io.py by hypermixer.hf.release when this release was written; do not edit.
"""save_pretrained / from_pretrained: `config.json` + `model.safetensors`. No pickle anywhere.

A classifier can be built from a masked-LM release: the encoder's weights load strictly, the head
starts fresh. Loading the same architecture loads everything strictly.

The same folder is a Hugging Face release: config.json also carries the keys transformers reads
(`model_type`, `auto_map`, ...) and save_pretrained writes the code that `auto_map` names, generated
from this package's source (hypermixer.hf.release; transformers itself is not imported here).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from .hypermixer_config import EncoderConfig
from .hypermixer_hf_release import hf_config_fields, write_release_code

# Format 1 gained the Hugging Face keys and code files without a version change: they are additions,
# which readers of format 1 ignore.
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def check_format_version(version: Any, where: str | os.PathLike) -> int:
    """The release format version if this code reads it; otherwise a one-line ValueError saying why."""
    supported = ", ".join(str(v) for v in SUPPORTED_FORMAT_VERSIONS)
    if isinstance(version, bool) or not isinstance(version, int):
        raise ValueError(
            f"{where}: format_version {version!r} is not a hypermixer release format "
            f"(supported: {supported}); is this a folder written by hypermixer's save_pretrained?"
        )
    if version not in SUPPORTED_FORMAT_VERSIONS:
        newer = "a newer" if version > max(SUPPORTED_FORMAT_VERSIONS) else "an older"
        raise ValueError(
            f"{where}: format_version {version} was written by {newer} hypermixer; "
            f"this one reads format_version {supported}"
        )
    return version


def release_config(architecture: str, encoder: dict[str, Any], head: dict[str, Any]) -> dict[str, Any]:
    """Everything config.json holds: hypermixer's own keys, then those Hugging Face reads."""
    return {
        "format_version": FORMAT_VERSION,
        "architecture": architecture,
        "encoder": encoder,
        "head": head,
        **hf_config_fields(architecture, encoder, head),
    }


def read_release_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse a release folder's config.json into {"architecture", "encoder": EncoderConfig, "head": {...}}."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} a model folder written by save_pretrained?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a JSON object")
    check_format_version(raw.get("format_version"), path)
    for key in ("architecture", "encoder"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    return {
        "architecture": raw["architecture"],
        "encoder": EncoderConfig.from_saved(raw["encoder"]),
        "head": raw.get("head", {}),
    }


class PretrainedMixin:
    """Adds save_pretrained/from_pretrained to a model with `.config`, `.encoder` and `head_config()`."""

    def save_pretrained(self, directory: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
        model: Any = self  # the nn.Module this mixin is part of (duck-typed: .config, .state_dict(), ...)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in model.state_dict().items()}
        config = release_config(type(self).__name__, model.config.to_dict(), model.head_config())
        # Write under temporary names, then rename: a crash never leaves a half-written file; config.json
        # comes last, so a folder that has one is complete.
        _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        for name, text in (extra_files or {}).items():
            _atomic_write(directory / name, lambda tmp, text=text: Path(tmp).write_text(text))
        write_release_code(directory)  # what config.json's auto_map names, for transformers' Auto classes
        _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu", **head_kwargs: Any):
        release = read_release_config(directory)
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{weights}: no such file")
        state = load_file(str(weights), device=map_location)
        same_architecture = release["architecture"] == cls.__name__
        kwargs = {**release["head"], **head_kwargs} if same_architecture else head_kwargs
        model: Any = cls(release["encoder"], **kwargs)  # type: ignore[call-arg]  # the nn.Module subclass's init
        if same_architecture and all(release["head"].get(k) == v for k, v in head_kwargs.items()):
            model.load_state_dict(state, strict=True)
        else:
            prefix = "encoder."
            encoder_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            model.encoder.load_state_dict(encoder_state, strict=True)
        return model.to(map_location)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


__all__ = [
    "PretrainedMixin",
    "read_release_config",
    "release_config",
    "check_format_version",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "FORMAT_VERSION",
    "SUPPORTED_FORMAT_VERSIONS",
]
