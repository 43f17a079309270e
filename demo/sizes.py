"""The demo's two sizes: `default` (the README's first command, a few minutes per stage on 2 cores)
and `ci` (the same stages on toy sizes, for the end-to-end test). Every setting a stage uses lives
here, and a stage's settings are recorded next to its output, so a re-run can tell whether the
output on disk is the one this size asks for."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
CORPUS = DATA_DIR / "corpus" / "imdb-unsup-sample.jsonl.gz"
CORPUS_NAME = "IMDB movie reviews (an unlabelled sample)"  # in headers and plot titles
GLUE_DIR = DATA_DIR / "glue"
TASK = "SST-2"
MIXERS = ("hypermixer", "transformer")


@dataclass(frozen=True)
class Size:
    name: str
    # data_pipeline build: tokenizer and shards
    build_args: tuple[str, ...]
    # pretrain: --set overrides on top of the shipped `cpu` recipe (pretrain/configs/cpu.json: the tiny
    # model, no dropout, peak lr 2e-3 with linear warmup and decay, batch 64); mixer, data, output are added
    pretrain_sets: tuple[str, ...]
    # finetune sweep arguments (one learning rate, one seed: a demo, not a study)
    finetune_args: tuple[str, ...]
    inits: tuple[str, ...] = field(default=("pretrained", "scratch"))


SIZES = {
    "default": Size(
        name="default",
        # 5% of the reviews held out: ~650 validation sequences for the pretraining curve
        build_args=("--vocab-size", "8192", "--seq-len", "128", "--validation-fraction", "0.05"),
        # the cpu recipe with half its batch and 1.5x its peak lr: twice the updates per token, so the model
        # learns more per token of this short budget. 800 steps of 32 sequences: 3.3M tokens, ~2 passes over
        # the ~12,900 train sequences (1.65M tokens), a few minutes on 2 cores
        pretrain_sets=(
            "optim.total_steps=800",
            "optim.warmup_steps=40",
            "optim.lr=3e-3",
            "batch.global_batch_size=32",
            "batch.micro_batch_size=16",
            "data.num_workers=1",
            "eval.every_steps=100",
            "eval.max_samples=512",
            "checkpoint.every_steps=200",
            "checkpoint.keep_last=1",
            "logging.every_steps=20",
        ),
        # small models want large learning rates; pretrained and scratch get the same recipe
        finetune_args=("--lrs", "1e-3", "--seeds", "0", "--batch-sizes", "32", "--epochs", "3"),
    ),
    "ci": Size(
        name="ci",
        build_args=("--vocab-size", "1024", "--seq-len", "64", "--validation-fraction", "0.05"),
        pretrain_sets=(
            "model.hidden_size=32",
            "model.num_layers=2",
            "model.num_heads=2",
            "model.intermediate_size=64",
            "optim.total_steps=20",
            "optim.warmup_steps=2",
            "optim.lr=3e-3",
            "batch.global_batch_size=16",
            "batch.micro_batch_size=8",
            "data.num_workers=1",
            "eval.every_steps=10",
            "eval.max_samples=64",
            "checkpoint.every_steps=10",
            "checkpoint.keep_last=1",
            "logging.every_steps=5",
            "logging.wandb.mode=disabled",
        ),
        finetune_args=(
            "--lrs",
            "3e-3",
            "--seeds",
            "0",
            "--batch-sizes",
            "32",
            "--epochs",
            "1",
            "--max-train-examples",
            "256",
            "--no-save-model",
        ),
    ),
}
