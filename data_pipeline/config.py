"""One dataclass for every setting, validated in one place and stored as JSON.

The config is what makes a build reproducible and distributable: ``plan_units`` writes it
to ``<out_dir>/config.json``; array tasks (``run-unit``), ``finalize`` and re-runs read it
back from there, and a re-run with different output-affecting settings is refused.
The number of workers is deliberately *not* part of it: the output does not depend on it.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataPipelineError

CONFIG_NAME = "config.json"
TOKENIZER_KINDS = ("wordpiece", "bpe", "unigram")


@dataclass
class BuildConfig:
    # -- inputs: paths, globs, `hf:NAME[:CONFIG][@SPLIT]`, or a `save_to_disk` folder
    inputs: list[str]
    out_dir: str
    text_field: str = "text"          # jsonl field / parquet column / datasets column
    txt_mode: str = "line"            # .txt: "line" = one document per line, "block" = blank-line separated
    hf_split: str = "train"           # default split for `hf:` inputs and DatasetDict folders
    on_error: str = "fail"            # structural input errors: "fail" or "skip" (and count)
    # -- normalise / filter
    unicode_normalization: str = "NFC"  # "NFC", "NFKC", "NFD", "NFKD" or "none"
    min_chars: int = 0                # drop documents shorter than this (after normalising); 0 = off
    dedup: str = "none"               # exact duplicates (blake2b): "none", "unit" (within a unit), "global"
    # -- tokenizer: a tokenizer.json (or a folder holding one) to reuse, or None to train one
    tokenizer: str | None = None
    tokenizer_kind: str = "wordpiece"
    vocab_size: int = 32768
    lowercase: bool = True
    min_frequency: int = 2
    tokenizer_sample_mb: float = 512.0  # cap on the text streamed into tokenizer training
    special_tokens: dict = field(default_factory=lambda: {
        "pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]"})
    # -- packing
    seq_len: int = 128
    packing: str = "concat"           # "concat" (documents joined by [SEP]) or "single" (one per sequence, padded)
    # -- split: a document goes to validation when its hash falls below this fraction
    validation_fraction: float = 0.005
    split_salt: str = ""              # change to draw a different (still stable) split
    # -- work units and shards
    unit_mb: float = 256.0            # big inputs are cut into units of about this much input
    shard_mb: float = 128.0           # target tar size
    block_sequences: int = 1024       # sequences per tar member (one .npy block); a shard holds whole blocks
    batch_docs: int = 2048            # documents per tokenizer call

    def __post_init__(self):
        if isinstance(self.inputs, str):
            self.inputs = [self.inputs]
        self.inputs = [str(x) for x in self.inputs]
        self.out_dir = str(self.out_dir)
        if self.tokenizer is not None:
            self.tokenizer = str(self.tokenizer)
        self.validate()

    def validate(self) -> None:
        def bad(msg):
            raise DataPipelineError(f"invalid config: {msg}")
        if not self.inputs:
            bad("no inputs given")
        choices = {"txt_mode": ("line", "block"), "on_error": ("fail", "skip"),
                   "unicode_normalization": ("NFC", "NFKC", "NFD", "NFKD", "none"),
                   "dedup": ("none", "unit", "global"), "tokenizer_kind": TOKENIZER_KINDS,
                   "packing": ("concat", "single")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                bad(f"{name}={getattr(self, name)!r}, expected one of {list(allowed)}")
        if not isinstance(self.seq_len, int) or self.seq_len < 3:
            bad(f"seq_len={self.seq_len!r} must be an integer >= 3 ([CLS] + 1 token + [SEP])")
        if not 0.0 <= self.validation_fraction < 1.0:
            bad(f"validation_fraction={self.validation_fraction} must be in [0, 1)")
        for name in ("unit_mb", "shard_mb", "tokenizer_sample_mb"):
            if not getattr(self, name) > 0:
                bad(f"{name} must be positive")
        if self.vocab_size < 16:
            bad(f"vocab_size={self.vocab_size} is too small")
        if self.min_chars < 0 or self.batch_docs < 1 or self.min_frequency < 1:
            bad("min_chars must be >= 0, batch_docs and min_frequency >= 1")
        if not isinstance(self.block_sequences, int) or self.block_sequences < 1:
            bad(f"block_sequences={self.block_sequences!r} must be an integer >= 1")
        missing = [k for k in ("pad", "unk", "cls", "sep", "mask") if not self.special_tokens.get(k)]
        if missing:
            bad(f"special_tokens lacks {missing}")
        if not self.text_field:
            bad("text_field is empty")

    # -- serialisation
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataPipelineError(f"invalid config: unknown settings {unknown}")
        return cls(**d)

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
        from .shards import write_json_atomic
        path = Path(path) if path else self.out / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, self.to_dict())
        return path


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
    cfg = BuildConfig.from_dict(d)
    # A folder that was moved still works: the config's out_dir follows the file.
    cfg.out_dir = str(p.parent)
    return cfg
