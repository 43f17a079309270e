"""Streaming preprocessing of text corpora into packed webdataset shards.

Python API::

    from data_pipeline import BuildConfig, build
    cfg = BuildConfig(inputs=["corpus/*.jsonl.zst"], out_dir="shards/", seq_len=128)
    manifest_path = build(cfg, workers=8)

Distributed (what ``slurm/`` calls): ``plan_units(cfg)`` once, ``run_unit(cfg, unit)`` per
unit anywhere, ``finalize(cfg)``.  Reading shards: ``data_pipeline.shards``.
See docs/data_pipeline.md.
"""

from .build import build, finalize, format_report, load_plan, plan_units, run_unit
from .config import BuildConfig, load_config
from .dedup import hash_unit, resolve_duplicates
from .errors import DataPipelineError
from .shards import decode_block, read_manifest, shard_urls
from .tokenizer import load_tokenizer, train_tokenizer
from .units import Unit

__all__ = [
    "BuildConfig",
    "DataPipelineError",
    "Unit",
    "build",
    "decode_block",
    "finalize",
    "format_report",
    "hash_unit",
    "load_config",
    "load_plan",
    "load_tokenizer",
    "plan_units",
    "read_manifest",
    "resolve_duplicates",
    "run_unit",
    "shard_urls",
    "train_tokenizer",
]
