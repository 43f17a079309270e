"""One dataclass for a fine-tuning run, validated in one place. It is what a sweep's plan stores
per run (as JSON) and what `train` writes into the run folder next to the results."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import FinetuneError
from finetune.tasks import trainable_task

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class FinetuneConfig:
    release: str  # a release folder: config.json, model.safetensors, tokenizer.json
    task: str
    output_dir: str
    # data: exactly one of a GLUE folder and a Hugging Face dataset (hub name or save_to_disk folder)
    glue_dir: str | None = None
    hf_dataset: str | None = None
    from_scratch: bool = False  # the release's config and tokenizer, random weights: the no-pretraining baseline
    # optimisation (defaults: BERT's GLUE recipe)
    learning_rate: float = 5e-5
    batch_size: int = 32
    epochs: int = 3
    warmup_ratio: float = 0.1  # of all optimizer steps, linear from 0; then linear decay to 0
    weight_decay: float = 0.01  # not on biases and norms
    max_grad_norm: float = 1.0  # 0: no clipping
    adam_eps: float = 1e-6
    max_seq_len: int | None = None  # None: the release's max_seq_len (a larger value is refused)
    seed: int = 0
    # hardware
    device: str = "auto"  # auto: cuda if available, else cpu
    precision: str = "auto"  # auto: bf16 autocast on a GPU that has it, else fp16 on GPU, fp32 on CPU
    eval_batch_size: int = 128
    # outputs
    max_train_examples: int | None = None  # a seeded random subset of the training set (quick runs)
    save_model: bool = True  # write the best epoch's weights (and tokenizer) to <output_dir>/model
    predict_test: bool = True  # write test-set predictions (GLUE server format) where test files exist

    def __post_init__(self) -> None:
        self.task = trainable_task(self.task).name
        for name in ("release", "output_dir", "glue_dir", "hf_dataset"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, str(value))
        if (self.glue_dir is None) == (self.hf_dataset is None):
            raise FinetuneError("give exactly one data source: --glue-dir DIR or --hf [NAME_OR_FOLDER]")
        release = Path(self.release)
        for name in ("config.json", "tokenizer.json"):
            if not (release / name).is_file():
                raise FinetuneError(f"{release / name}: no such file (is {release} a release folder from pretrain.export?)")
        if not self.from_scratch and not (release / "model.safetensors").is_file():
            raise FinetuneError(f"{release / 'model.safetensors'}: no such file (use --from-scratch for random weights)")
        if self.glue_dir is not None and not Path(self.glue_dir).is_dir():
            raise FinetuneError(f"{self.glue_dir}: no such folder (expected the GLUE layout <glue_dir>/<TASK>/train.tsv)")
        _positive_int(self, "batch_size", "epochs", "eval_batch_size")
        _positive_int(self, *(n for n in ("max_seq_len", "max_train_examples") if getattr(self, n) is not None))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise FinetuneError(f"seed must be an integer >= 0, got {self.seed!r}")
        _number(self, "learning_rate", low=0.0, low_open=True)
        _number(self, "adam_eps", low=0.0, low_open=True)
        _number(self, "weight_decay", low=0.0)
        _number(self, "max_grad_norm", low=0.0)
        _number(self, "warmup_ratio", low=0.0, high=1.0)
        if self.precision not in PRECISIONS:
            raise FinetuneError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise FinetuneError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision == "fp16" and self.device.startswith("cpu"):
            raise FinetuneError("precision fp16 needs a GPU (use bf16 or fp32 on CPU)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise FinetuneError(f"unknown setting {unknown[0]!r} (known: {', '.join(sorted(known))})")
        return cls(**values)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return FinetuneConfig.from_dict({**self.to_dict(), **changes})


def _positive_int(config: FinetuneConfig, *names: str) -> None:
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FinetuneError(f"{name} must be a positive integer, got {value!r}")


def _number(config: FinetuneConfig, name: str, low: float, high: float = math.inf, low_open: bool = False) -> None:
    value = getattr(config, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and low <= value <= high
    if not ok or (low_open and value == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise FinetuneError(f"{name} must be a number {bound}, got {value!r}")
