"""pretrain.phases: a pretraining run that starts from a release's weights at a longer length (BERT's
last phase at 512 tokens), the `cpu-long` recipe, and the mistakes it refuses."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_pipeline.build import build
from data_pipeline.config import BuildConfig
from hypermixer import ForMaskedLM
from pretrain.config import ConfigError, load_config, resolve
from pretrain.main import EXIT_CONFIG
from pretrain.phases import main, release_model

ROOT = Path(__file__).resolve().parents[1]
SHAPE = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"]


def shards_at(root: Path, corpus: Path, seq_len: int, tokenizer: Path | None = None, vocab: int = 64) -> Path:
    build(
        BuildConfig(
            inputs=[str(corpus)],
            out_dir=str(root),
            vocab_size=vocab,
            seq_len=seq_len,
            shard_mb=0.02,
            validation_fraction=0.1,
            tokenizer=str(tokenizer) if tokenizer else None,
        ),
        workers=1,
        progress=False,
    )
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("phases")
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"review {i} of the film , a story told at length by the cast" for i in range(600)))
    short = shards_at(root / "short", corpus, 16)
    return {
        "short": short,
        "long": shards_at(root / "long", corpus, 32, tokenizer=short / "tokenizer.json"),
        "other_tokenizer": shards_at(root / "other", corpus, 32, vocab=90),
    }


def run_config(data_path: Path, *extra: str):
    sets = [f"data.path={data_path}", *SHAPE, "model.hypermixer_position=learned", *extra]
    return resolve(load_config("cpu-long", sets), world_size=1).model


def make_release(folder: Path, data: dict[str, Path], *extra: str) -> Path:
    """A release of the first phase: the run's architecture at the short data's length (16)."""
    torch.manual_seed(1)
    ForMaskedLM(run_config(data["short"], *extra)).save_pretrained(folder)
    shutil.copyfile(data["short"] / "tokenizer.json", folder / "tokenizer.json")
    return folder


def test_cpu_long_is_valid_once_data_is_given(data):
    config = run_config(data["long"])
    assert config.max_seq_len == 32 and config.attention_dropout == 0.0 and config.dropout == 0.0


def test_the_run_starts_from_the_release_with_its_positions_extended(tmp_path, data):
    release = make_release(tmp_path / "release", data)
    pretrained = ForMaskedLM.from_pretrained(release).state_dict()
    model = release_model(release, "copy")(run_config(data["long"]))
    assert model.config.max_seq_len == 32
    extended = {"encoder.embeddings.position.weight", "encoder.blocks.0.mixer.position_table"}
    for name, tensor in model.state_dict().items():
        if name in extended:  # copy: positions 16-31 repeat 0-15, and 0-15 keep their values
            assert tensor.shape[0] == 32
            assert torch.equal(tensor[:16], pretrained[name]) and torch.equal(tensor[16:], pretrained[name])
        else:
            assert torch.equal(tensor, pretrained[name]), name
    interpolated = release_model(release, "interpolate")(run_config(data["long"]))
    table = interpolated.state_dict()["encoder.embeddings.position.weight"]
    assert torch.equal(table[0], pretrained["encoder.embeddings.position.weight"][0])
    assert not torch.equal(table[16:], pretrained["encoder.embeddings.position.weight"])


def test_another_architecture_is_refused_naming_the_setting(tmp_path, data):
    release = make_release(tmp_path / "release", data, "model.mixer=transformer")
    with pytest.raises(ConfigError, match="mixer: the release's 'transformer', this run's 'hypermixer'"):
        release_model(release, "copy")(run_config(data["long"]))


def test_data_built_with_another_tokenizer_is_one_line(tmp_path, data, capsys):
    release = make_release(tmp_path / "release", data)
    argv = ["--init-from", str(release), "--config", "cpu-long", "--set", f"data.path={data['other_tokenizer']}"]
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "tokenizer differs from the one" in err and "--tokenizer" in err
    argv = ["--init-from", str(tmp_path / "nothing"), "--config", "cpu-long", "--set", f"data.path={data['long']}"]
    assert main(argv) == EXIT_CONFIG
    assert "nothing/config.json: no such file" in capsys.readouterr().err


def test_a_second_phase_trains_through_the_entry_point(tmp_path, data):
    release = make_release(tmp_path / "release", data)
    run_dir = tmp_path / "phase2"
    sets = [
        f"data.path={data['long']}",
        f"output_dir={run_dir}",
        *SHAPE,
        "model.hypermixer_position=learned",
        "optim.total_steps=4",
        "optim.warmup_steps=1",
        "batch.global_batch_size=4",
        "batch.micro_batch_size=4",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
        "logging.every_steps=2",
        "logging.wandb.mode=disabled",
        "deepspeed.zero_optimization.stage=0",
    ]
    command = [sys.executable, str(ROOT / "pretrain" / "phases.py"), "--init-from", str(release)]
    command += ["--config", "cpu-long", "--set", *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "completed 4 steps" in result.stdout
