"""save_pretrained / from_pretrained: `config.json` + `model.safetensors`. No pickle anywhere.

A classifier can be built from a masked-LM release: the encoder's weights load strictly, the head
starts fresh. Loading the same architecture loads everything strictly.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from hypermixer.config import EncoderConfig

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def read_release_config(directory: str | os.PathLike) -> dict[str, Any]:
    """Parse a release folder's config.json into {"architecture", "encoder": EncoderConfig, "head": {...}}."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (is {directory} a model folder written by save_pretrained?)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if raw.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {raw.get('format_version')!r} is not {FORMAT_VERSION}")
    for key in ("architecture", "encoder"):
        if key not in raw:
            raise ValueError(f"{path}: missing key {key!r}")
    return {"architecture": raw["architecture"], "encoder": EncoderConfig.from_dict(raw["encoder"]), "head": raw.get("head", {})}


class PretrainedMixin:
    """Adds save_pretrained/from_pretrained to a model with `.config`, `.encoder` and `head_config()`."""

    def save_pretrained(self, directory: str | os.PathLike, extra_files: dict[str, str] | None = None) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.state_dict().items()}
        config = {
            "format_version": FORMAT_VERSION,
            "architecture": type(self).__name__,
            "encoder": self.config.to_dict(),
            "head": self.head_config(),
        }
        # Write under temporary names, then rename: a crash never leaves a half-written release.
        _atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(state, tmp, metadata={"format": "pt"}))
        _atomic_write(directory / CONFIG_FILE, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))
        for name, text in (extra_files or {}).items():
            _atomic_write(directory / name, lambda tmp, text=text: Path(tmp).write_text(text))
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
        model = cls(release["encoder"], **kwargs)
        if same_architecture and all(release["head"].get(k) == v for k, v in head_kwargs.items()):
            model.load_state_dict(state, strict=True)
        else:
            prefix = "encoder."
            encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
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


__all__ = ["PretrainedMixin", "read_release_config", "CONFIG_FILE", "WEIGHTS_FILE", "FORMAT_VERSION"]
