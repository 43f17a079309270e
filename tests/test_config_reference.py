"""docs/config.md is generated from the typed configs (python -m tools.config_reference); it must match."""

import dataclasses
from pathlib import Path

from hypermixer import EncoderConfig
from pretrain import config as cfg
from tools import config_reference
from tools.config_reference import REGENERATE, generate
from tools.pretrain_reference import field_comments

DOC = Path(__file__).resolve().parents[1] / config_reference.DOC


def test_docs_config_md_is_up_to_date():
    expected = generate()
    current = DOC.read_text() if DOC.is_file() else ""
    assert current == expected, f"{DOC} is out of date with the config code; regenerate it with: {REGENERATE}"


def test_every_config_key_is_documented():
    text = generate()
    sections = {
        "data": cfg.DataConfig,
        "optim": cfg.OptimConfig,
        "batch": cfg.BatchConfig,
        "eval": cfg.EvalConfig,
        "checkpoint": cfg.CheckpointConfig,
    }
    for prefix, section in sections.items():
        for name in section.model_fields:
            assert f"| `{prefix}.{name}` |" in text
    for f in dataclasses.fields(EncoderConfig):
        assert f"| `model.{f.name}` |" in text
    for key in cfg.DERIVED_DEEPSPEED_KEYS:
        assert f"| `{key}` |" in text
    # values as the shipped configs set them
    assert "| `optim.total_steps` | int \\| null | `null` | `2000` | `100000` | `1000000` | `800` |" in text


def test_field_comments_come_from_the_source():
    notes = field_comments(cfg.DataConfig)
    assert notes["num_workers"] == "DataLoader worker processes per rank"
    assert field_comments(cfg.MetricsConfig)["peak_tflops"].startswith("Peak FLOP/s")  # a comment above the field


def test_every_stage_config_key_is_documented():
    from data_pipeline.config import BuildConfig
    from finetune.config import FinetuneConfig
    from slurm.options import ClusterOptions

    text = generate()
    for model in (BuildConfig, FinetuneConfig, ClusterOptions):
        for name in model.model_fields:
            assert f"| `{name}` |" in text, (model.__name__, name)
