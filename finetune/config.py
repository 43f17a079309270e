"""One dataclass for a fine-tuning run, validated in one place. It is what a sweep's plan stores
per run (as JSON) and what `train` writes into the run folder next to the results."""

from __future__ import annotations

import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common.config import Checked
from finetune.errors import FinetuneError
from finetune.tasks import trainable_task

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS = typing.get_args(Precision)


class FinetuneConfig(Checked):
    """A fine-tuning run. The training flags of `python -m finetune train|sweep` are made from these
    fields (`common.config.add_flags`); their descriptions are the flags' help."""

    error = FinetuneError
    label = "invalid fine-tuning config"

    release: str = Field(description="release folder (config.json, model.safetensors, tokenizer.json)")
    task: str = Field(description="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE or WNLI")
    output_dir: str = Field(description="the run folder")
    # data: exactly one of a GLUE folder and a Hugging Face dataset (hub name or save_to_disk folder)
    glue_dir: str | None = None
    hf_dataset: str | None = None
    from_scratch: bool = Field(
        False, description="the release's config and tokenizer, random weights: the no-pretraining baseline"
    )
    # optimisation (defaults: BERT's GLUE recipe)
    learning_rate: float = Field(5e-5, gt=0, allow_inf_nan=False)
    batch_size: int = Field(32, gt=0)
    epochs: int = Field(3, gt=0)
    warmup_ratio: float = Field(
        0.1, ge=0, le=1, description="of all optimizer steps, linear from 0; then linear decay to 0"
    )
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False, description="not on biases and norms")
    max_grad_norm: float = Field(1.0, ge=0, allow_inf_nan=False, description="0: no clipping")
    adam_eps: float = Field(1e-6, gt=0, allow_inf_nan=False)
    dropout: float | None = Field(
        None,
        ge=0,
        lt=1,
        allow_inf_nan=False,
        description="hidden dropout (embeddings, blocks, classifier head); default: the release's. "
        "Attention dropout stays the release's",
    )
    max_seq_len: int | None = Field(
        None,
        gt=0,
        description="truncate to this many tokens (default: the release's max_seq_len; a larger value is refused)",
    )
    seed: int = Field(0, ge=0)
    # hardware
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (auto: cuda if available)")
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast on a GPU that has it, fp16 on older GPUs, fp32 on CPU"
    )
    eval_batch_size: int = Field(128, gt=0)
    # outputs
    max_train_examples: int | None = Field(None, gt=0, description="train on a seeded random subset of this size")
    save_model: bool = Field(True, description="write the best epoch's weights (and tokenizer) to <run>/model")
    predict_test: bool = Field(
        True, description="write test-set predictions (GLUE server format) where test files exist"
    )

    @field_validator("release", "output_dir", "glue_dir", "hf_dataset", mode="before")
    @classmethod
    def _path_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _check_files(self) -> FinetuneConfig:
        # FinetuneError (not ValueError) passes through pydantic as is: one line, raised at once.
        self.task = trainable_task(self.task).name
        if (self.glue_dir is None) == (self.hf_dataset is None):
            raise FinetuneError("give exactly one data source: --glue-dir DIR or --hf [NAME_OR_FOLDER]")
        release = Path(self.release)
        for name in ("config.json", "tokenizer.json"):
            if not (release / name).is_file():
                raise FinetuneError(
                    f"{release / name}: no such file (is {release} a release folder from pretrain.export?)"
                )
        if not self.from_scratch and not (release / "model.safetensors").is_file():
            raise FinetuneError(
                f"{release / 'model.safetensors'}: no such file (use --from-scratch for random weights)"
            )
        if self.glue_dir is not None and not Path(self.glue_dir).is_dir():
            raise FinetuneError(
                f"{self.glue_dir}: no such folder (expected the GLUE layout <glue_dir>/<TASK>/train.tsv)"
            )
        if self.device != "auto" and not self.device.startswith(("cpu", "cuda")):
            raise FinetuneError(f"device: must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.precision == "fp16" and self.device.startswith("cpu"):
            raise FinetuneError("precision fp16 needs a GPU (use bf16 or fp32 on CPU)")
        return self
