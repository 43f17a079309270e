"""One typed model (pydantic, `common.config`) for every setting, validated in one place and stored as JSON.

The config is what makes a build reproducible and distributable: ``plan_units`` writes it
to ``<out_dir>/config.json``; array tasks (``run-unit``), ``finalize`` and re-runs read it
back from there, and a re-run with different output-affecting settings is refused.
The number of workers is deliberately *not* part of it: the output does not depend on it.
"""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from common.config import Checked

from .errors import DataPipelineError

CONFIG_NAME = "config.json"
TokenizerKind = Literal["wordpiece", "bpe", "unigram"]
TOKENIZER_KINDS = typing.get_args(TokenizerKind)
SPECIAL_TOKENS = ("pad", "unk", "cls", "sep", "mask")


class BuildConfig(Checked):
    """Every setting of a build; the flags of `python -m data_pipeline build|plan|train-tokenizer` are
    made from these fields (`common.config.add_flags`), their descriptions are the flags' help."""

    error = DataPipelineError
    label = "invalid config"

    # -- inputs: paths, globs, `hf:NAME[:CONFIG][@SPLIT]`, or a `save_to_disk` folder
    inputs: list[str] = Field(min_length=1)
    out_dir: str
    text_field: str = Field("text", min_length=1, description="jsonl field / parquet or datasets column")
    txt_mode: Literal["line", "block"] = Field(
        "line", description=".txt documents: one per line, or blank-line separated blocks"
    )
    hf_split: str = Field("train", description="default split for hf: inputs and DatasetDict folders")
    on_error: Literal["fail", "skip"] = Field(
        "fail", description="bad records / corrupt files: stop with an error, or skip and count"
    )
    unicode_normalization: Literal["NFC", "NFKC", "NFD", "NFKD", "none"] = "NFC"
    min_chars: int = Field(0, ge=0, description="drop documents shorter than this (after normalising); 0 = off")
    dedup: Literal["none", "unit", "global"] = Field(
        "none",
        description="drop exact duplicate documents: within each unit, or across the whole input "
        "(global: an extra hash pass before the units)",
    )
    # -- tokenizer: a tokenizer.json (or a folder holding one) to reuse, or None to train one
    tokenizer: str | None = Field(
        None, description="reuse this tokenizer.json (or a folder holding one) instead of training one"
    )
    tokenizer_kind: TokenizerKind = "wordpiece"
    vocab_size: int = Field(32768, ge=16)
    lowercase: bool = True
    min_frequency: int = Field(2, ge=1)
    tokenizer_sample_mb: float = Field(512.0, gt=0, description="cap on the text streamed into tokenizer training")
    special_tokens: dict[str, str] = Field(
        default_factory=lambda: {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"}
    )
    # -- packing
    seq_len: int = Field(128, ge=3, description="tokens per sequence, [CLS] and [SEP] included")
    packing: Literal["concat", "single"] = Field(
        "concat", description="concat: documents joined by [SEP] and cut; single: one document per sequence, padded"
    )
    # -- split: a document goes to validation when its hash falls below this fraction
    validation_fraction: float = Field(0.005, ge=0, lt=1)
    split_salt: str = Field("", description="change to draw another (still stable) train/validation split")
    # -- work units and shards
    unit_mb: float = Field(256.0, gt=0, description="cut big inputs into work units of about this size")
    shard_mb: float = Field(128.0, gt=0, description="target shard size")
    block_sequences: int = Field(
        1024, ge=1, description="sequences per tar member (one .npy block); a shard holds whole blocks"
    )
    batch_docs: int = Field(2048, ge=1, description="documents per tokenizer call")

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_as_list(cls, value: Any) -> Any:
        if isinstance(value, (str, Path)):
            value = [value]
        return [str(x) if isinstance(x, Path) else x for x in value] if isinstance(value, (list, tuple)) else value

    @field_validator("out_dir", "tokenizer", mode="before")
    @classmethod
    def _path_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    def problems(self) -> list[str]:
        missing = [k for k in SPECIAL_TOKENS if not self.special_tokens.get(k)]
        return [f"special_tokens: lacks {missing}"] if missing else []

    def output_affecting(self) -> dict[str, Any]:
        """Everything except where the output goes: equal for a legitimate re-run."""
        d = self.to_dict()
        d.pop("out_dir")
        return d

    @property
    def out(self) -> Path:
        return Path(self.out_dir)

    @property
    def work_dir(self) -> Path:
        return Path(self.out_dir) / "_work"

    def save(self, path: str | Path | None = None) -> Path:
        from common.files import write_json_atomic

        path = Path(path) if path else self.out / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path


def as_config(cfg: BuildConfig | dict[str, Any] | str | Path) -> BuildConfig:
    """A BuildConfig, a dict of its fields, or a config file / build folder -> a BuildConfig."""
    if isinstance(cfg, BuildConfig):
        return cfg
    if isinstance(cfg, dict):
        return BuildConfig.from_dict(cfg)
    return load_config(cfg)


def load_config(path_or_out_dir: str | Path) -> BuildConfig:
    """Read a config JSON (the file, or the build folder holding ``config.json``)."""
    p = Path(path_or_out_dir)
    if p.is_dir():
        p = p / CONFIG_NAME
    if not p.is_file():
        raise DataPipelineError(f"{p}: config not found (run `python -m data_pipeline plan` first)")
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPipelineError(f"{p}: corrupt config, not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DataPipelineError(f"{p}: corrupt config, not a JSON object")
    # A folder that was moved still works: the config's out_dir follows the file.
    return BuildConfig.from_dict({**d, "out_dir": str(p.parent)}, source=str(p))
