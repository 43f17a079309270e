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
    task: str = Field(
        "",
        description="CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE or WNLI; with --train-file, a name for "
        "your task (default: the file's name, or its folder's when the file is called train)",
    )
    output_dir: str = Field(description="the run folder")
    # data: exactly one of a GLUE folder, a Hugging Face dataset (hub name or save_to_disk folder) and
    # the user's own files (finetune.files)
    glue_dir: str | None = None
    hf_dataset: str | None = None
    train_file: str | None = Field(
        None, description="your own labelled data instead of GLUE: a .jsonl, .csv or .tsv file (optionally .gz)"
    )
    dev_file: str | None = Field(None, description="labelled dev data, laid out as the training file")
    test_file: str | None = Field(
        None, description="rows to predict (no labels needed): predictions/<task>.tsv, with the original labels"
    )
    dev_size: int | None = Field(
        None,
        gt=0,
        description="instead of --dev-file: hold this many rows of the training file out as the dev set, "
        "chosen by a hash of each row's id (the same split on every run and seed)",
    )
    text_field: str = Field("text", description="with --train-file: the column holding the text")
    text_pair_field: str | None = Field(None, description="with --train-file: a second text column, for pairs")
    label_field: str = Field("label", description="with --train-file: the column holding the label")
    id_field: str | None = Field(
        None,
        description="with --train-file: the column holding each row's id, for predictions and the --dev-size "
        "split (default: 'id' when the file has one, else the line number)",
    )
    problem: Literal["classification", "regression"] = Field(
        "classification",
        description="with --train-file: classification (labels are strings or integers, given ids in sorted "
        "order) or regression (a number)",
    )
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
        description="tokens per input (default: the release's max_seq_len; beyond it, add --extend-positions)",
    )
    extend_positions: Literal["copy", "interpolate"] | None = Field(
        None,
        description="to fine-tune beyond the release's max_seq_len: extend its learned position embeddings, "
        "copy (the table repeats after the release's length; the first positions keep their values) or "
        "interpolate (the table stretched linearly)",
    )
    long_inputs: Literal["truncate", "windows"] = Field(
        "truncate",
        description="inputs longer than max_seq_len: truncate (keep the first max_seq_len tokens) or windows "
        "(split into windows of max_seq_len tokens, trained on as examples; a document's prediction is the "
        "mean of its windows' probabilities, or scores); single texts only",
    )
    window_stride: int | None = Field(
        None,
        gt=0,
        description="with --long-inputs windows: tokens from one window's start to the next's "
        "(default: a whole window, no overlap)",
    )
    seed: int = Field(0, ge=0)
    # hardware
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N (auto: cuda if available)")
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast on a GPU that has it, fp16 on older GPUs, fp32 on CPU"
    )
    eval_batch_size: int = Field(128, gt=0)
    # outputs
    max_train_examples: int | None = Field(
        None,
        gt=0,
        description="train on a random subset of this size: seeded for GLUE tasks; with --train-file the "
        "same subset for every seed (a hash of each row's id), a smaller one inside a larger one",
    )
    save_model: bool = Field(True, description="write the best epoch's weights (and tokenizer) to <run>/model")
    predict_test: bool = Field(
        True, description="write test-set predictions (GLUE server format) where test files exist"
    )

    @field_validator(
        "release", "output_dir", "glue_dir", "hf_dataset", "train_file", "dev_file", "test_file", mode="before"
    )
    @classmethod
    def _path_as_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, Path) else value

    @model_validator(mode="after")
    def _check_files(self) -> FinetuneConfig:
        # FinetuneError (not ValueError) passes through pydantic as is: one line, raised at once.
        if sum(x is not None for x in (self.glue_dir, self.hf_dataset, self.train_file)) != 1:
            raise FinetuneError(
                "give exactly one data source: --glue-dir DIR, --hf [NAME_OR_FOLDER] or --train-file FILE"
            )
        if self.train_file is None:
            self._check_glue_task()
        else:
            self._check_user_files()
        if self.window_stride is not None and self.long_inputs != "windows":
            raise FinetuneError("--window-stride needs --long-inputs windows")
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

    def _check_glue_task(self) -> None:
        for name in ("dev_file", "test_file", "dev_size", "text_pair_field", "id_field"):
            if getattr(self, name) is not None:
                raise FinetuneError(f"--{name.replace('_', '-')} needs --train-file (your own data)")
        if not self.task:
            raise FinetuneError("give --task (a GLUE task) or --train-file FILE (your own data)")
        task = trainable_task(self.task)
        self.task = task.name
        if self.long_inputs == "windows" and task.is_pair:
            raise FinetuneError(f"--long-inputs windows takes single texts; {task.name} has sentence pairs")

    def _check_user_files(self) -> None:
        from finetune.files import default_task_name, file_format

        for name in ("train_file", "dev_file", "test_file"):
            path = getattr(self, name)
            if path is not None:
                if not Path(path).is_file():
                    raise FinetuneError(f"{path}: no such file (--{name.replace('_', '-')})")
                file_format(path)
        if (self.dev_file is None) == (self.dev_size is None):
            raise FinetuneError(
                "give a dev set: --dev-file FILE, or --dev-size N to hold N rows of the training file out"
                if self.dev_file is None
                else "give --dev-file or --dev-size, not both"
            )
        if self.long_inputs == "windows" and self.text_pair_field is not None:
            raise FinetuneError("--long-inputs windows takes single texts, not pairs (--text-pair-field)")
        self.task = self.task or default_task_name(str(self.train_file))
