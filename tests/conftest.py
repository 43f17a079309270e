"""Shared test settings: offline wandb, one thread per process (2-core CI), deterministic torch."""

import os

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
