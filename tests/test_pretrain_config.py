"""pretrain.config: shipped names, --set overrides, one clear error per mistake, the derived DeepSpeed config."""

from __future__ import annotations

import json

import pytest

from data_pipeline.build import build
from data_pipeline.config import BuildConfig
from pretrain.config import (
    ConfigError,
    config_path,
    deepspeed_config,
    load_config,
    parse_value,
    resolve,
    shipped_configs,
)
from pretrain.main import EXIT_CONFIG, main


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    # > 1,024 train sequences: one micro-batch of the `small` recipe (64) for each of the 16 data streams
    (root / "corpus.txt").write_text("\n".join(f"line {i} of the tiny corpus for the config tests" for i in range(800)))
    build(
        BuildConfig(
            inputs=[str(root / "corpus.txt")],
            out_dir=str(root / "out"),
            vocab_size=64,
            seq_len=16,
            shard_mb=0.02,
            validation_fraction=0.1,
        ),
        workers=1,
        progress=False,
    )
    return str(root / "out")


def write(tmp_path, values) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return str(path)


def test_shipped_configs_resolve_by_bare_name(tmp_path, monkeypatch):
    assert {"tiny", "small", "base", "cpu"} <= set(shipped_configs())
    assert config_path("tiny") == config_path("tiny.json")
    assert config_path("base").name == "base.json"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.json").write_text("{}")
    assert config_path("mine.json").resolve() == (tmp_path / "mine.json").resolve()  # a path is used as given
    with pytest.raises(ConfigError, match="not a shipped config"):
        config_path("tinyy")


@pytest.mark.parametrize("name", ["tiny", "small", "base", "cpu"])
def test_shipped_configs_are_valid_once_data_is_given(name, shards):
    config = load_config(name, [f"data.path={shards}"])
    resolved = resolve(config, world_size=1)
    assert resolved.model.mixer == "hypermixer"
    assert resolved.model.vocab_size == resolved.manifest["vocab_size"]  # taken from the data
    assert resolved.model.max_seq_len == resolved.manifest["seq_len"]


def test_set_overrides_parse_json_or_strings(shards):
    assert parse_value("1e-4") == 1e-4 and parse_value("null") is None and parse_value("[0.9, 0.95]") == [0.9, 0.95]
    assert parse_value("/data/shards") == "/data/shards" and parse_value("transformer") == "transformer"
    config = load_config(
        "tiny",
        [
            f"data.path={shards}",
            "optim.lr=3e-4",
            "model.mixer=transformer",
            "deepspeed.zero_optimization.stage=3",
            "deepspeed.zero_optimization.overlap_comm=true",
            "eval.max_samples=null",
            "optim.betas=[0.9,0.95]",
            "seed=7",
        ],
    )
    assert config.optim.lr == 3e-4 and config.model.mixer == "transformer" and config.seed == 7
    assert config.deepspeed["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert config.eval.max_samples is None and config.optim.betas == [0.9, 0.95]


def test_every_mistake_gets_its_own_message(tmp_path):
    path = write(
        tmp_path,
        {
            "precision": "fp8",
            "model": {"preset": "tiny", "hidden_sise": 64},
            "data": {"path": None, "mask_prob": 1.5},
            "optim": {"lr": -1, "decay": "step", "total_steps": 10, "total_tokens": 100, "warmup_steps": 0},
            "batch": {"global_batch_size": 10, "micro_batch_size": 4},
            "deepspeed": {"train_batch_size": 8, "bf16": {"enabled": True}, "zero_optimization": {"stage": 4}},
            "logging": {"wandb": {"mode": "sometimes"}},
            "checkpoints": {},
        },
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    problems = caught.value.problems
    expected = [
        "checkpoints: unknown key",
        "precision: must be one of",
        "model.hidden_sise: unknown key",
        "data.path: required",
        "data.mask_prob",
        "optim.lr",
        "optim.decay",
        "optim.total_steps: give exactly one of optim.total_steps and optim.total_tokens",
        "batch.global_batch_size (10) must be a multiple of batch.micro_batch_size (4)",
        "deepspeed.train_batch_size: derived by this config; set batch.global_batch_size",
        "deepspeed.bf16.enabled: derived",
        "deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3",
        "logging.wandb.mode",
    ]
    for fragment in expected:
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    assert len(problems) == len(expected)
    assert str(caught.value).startswith("invalid pretraining config:\n  - ")


def test_an_unknown_key_does_not_hide_a_mistake_in_its_namesake(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(tmp_path, {"data": {"path": "x"}, "optim": {"total_steps": 10, "warmup_steps": 1}}),
            ["optim.lrr=1", "optim.lr=-1"],
        )
    problems = caught.value.problems
    assert sorted(p.split(":")[0] for p in problems) == ["optim.lr", "optim.lrr"], problems
    assert "optim.lr: must be > 0, got -1 (--set optim.lr=-1)" in problems  # key, value, bound and the flag
    assert any(p.startswith("optim.lrr: unknown key; did you mean 'optim.lr'?") for p in problems)


def test_wrong_types_are_named(tmp_path):
    path = write(
        tmp_path,
        {"data": {"path": "x", "num_workers": "2"}, "optim": {"total_steps": 1.5}, "train": {"compile": "yes"}},
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.problems == [  # the key, what was expected, the value and the file, in one line
        f'data.num_workers: expected an integer, got "2" (in {path})',
        f"optim.total_steps: expected an integer or null, got 1.5 (in {path})",
        f'train.compile: expected true/false, got "yes" (in {path})',
    ]


def test_resolve_checks_against_data_and_world_size(shards):
    config = load_config(
        "tiny",
        [
            f"data.path={shards}",
            "batch.global_batch_size=24",
            "batch.micro_batch_size=4",
            "model.vocab_size=10",
            "model.max_seq_len=8",
        ],
    )
    with pytest.raises(ConfigError) as caught:
        resolve(config, world_size=4)
    text = "\n".join(caught.value.problems)
    assert "global_batch_size (24) must be a multiple of micro_batch_size (4) x world size (4) = 16" in text
    assert "model.vocab_size (10) is smaller than the data's vocabulary" in text
    assert "model.max_seq_len (8) is shorter than the data's seq_len (16)" in text
    with pytest.raises(ConfigError, match="no such|manifest not found"):
        resolve(load_config("tiny", ["data.path=/nonexistent/shards"]), world_size=1)
    with pytest.raises(ConfigError, match="fewer than one micro-batch"):
        resolve(
            load_config("tiny", [f"data.path={shards}", "batch.global_batch_size=2048", "batch.micro_batch_size=1024"]),
            world_size=2,
        )
    with pytest.raises(ConfigError) as caught:
        resolve(
            load_config(
                "tiny",
                [
                    f"data.path={shards}",
                    "batch.global_batch_size=48",
                    "batch.micro_batch_size=16",
                    "data.num_workers=2",
                ],
            ),
            world_size=3,
        )
    assert caught.value.problems == [
        (
            "data.streams (16) must be a multiple of world size x loader workers "
            "(3 x 2 = 6); set data.num_workers or data.streams (at the run's start)"
        )
    ]


def test_a_resume_lists_what_changed_and_refuses_what_cannot(shards):
    from pretrain.startup import check_resume

    sets = [f"data.path={shards}", "batch.global_batch_size=16", "batch.micro_batch_size=4"]
    written = resolve(load_config("tiny", [*sets, "data.num_workers=2"]), world_size=2)
    state = {"fingerprint": written.fingerprint(), "config": written.config.to_dict(), "world_size": 2}
    now = resolve(load_config("tiny", [*sets, "data.num_workers=0", "logging.every_steps=5"]), world_size=1)
    assert check_resume(now, state, shards) == [
        "world size: 2 -> 1 (gradient accumulation 4; the same global sample order)",
        "data.num_workers: 2 -> 0",
        "logging.every_steps: 20 -> 5",
    ]
    assert check_resume(written, state, shards) == []
    changed = resolve(load_config("tiny", [*sets, "data.streams=8", "seed=1", "precision=bf16"]), world_size=1)
    with pytest.raises(ConfigError) as caught:
        check_resume(changed, state, shards)
    assert caught.value.problems == [
        f"cannot resume from {shards}: data.streams: 16 in the checkpoint, 8 now",
        f'cannot resume from {shards}: precision: "fp32" in the checkpoint, "bf16" now',
        f"cannot resume from {shards}: seed: 0 in the checkpoint, 1 now",
        (
            "(model, data, batch, seed, precision and ZeRO stage must match; start a new run in another output_dir "
            "to change them)"
        ),
    ]
    old = {**state["fingerprint"], "world_size": 2, "data": {**state["fingerprint"]["data"], "num_workers": 2}}
    del old["data"]["streams"]  # a checkpoint of the per-world-size order
    with pytest.raises(ConfigError, match="written with the per-world-size data order"):
        check_resume(written, {**state, "fingerprint": old}, shards)


def test_resolve_derives_accumulation_steps_and_deepspeed_config(shards):
    config = load_config(
        "tiny",
        [
            f"data.path={shards}",
            "batch.global_batch_size=64",
            "batch.micro_batch_size=8",
            "optim.total_steps=null",
            "optim.total_tokens=100000",
            "optim.warmup_steps=10",
            "deepspeed.zero_optimization.stage=3",
            "deepspeed.fp16.initial_scale_power=8",
        ],
    )
    resolved = resolve(config, world_size=2)
    assert resolved.grad_accum == 4
    assert resolved.total_steps == -(-100000 // (64 * 16))  # ceil(tokens / tokens per step)
    ds = resolved.deepspeed
    assert (ds["train_batch_size"], ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (
        64,
        8,
        4,
    )
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["fp16"]["enabled"] is False and ds["fp16"]["initial_scale_power"] == 8
    assert ds["bf16"] == {"enabled": False}  # tiny is fp32


def test_optimizer_offload_selects_deepspeeds_cpu_adam(shards):
    config = load_config("tiny", [f"data.path={shards}", "deepspeed.zero_optimization.offload_optimizer.device=cpu"])
    assert deepspeed_config(config, 1)["optimizer"]["params"]["torch_adam"] is False
    config = load_config("tiny", [f"data.path={shards}", "optim.implementation=deepspeed"])
    assert deepspeed_config(config, 1)["optimizer"]["params"]["torch_adam"] is False


def test_main_returns_the_config_exit_code_with_the_errors(capsys, tmp_path):
    assert main(["--config", "tiny"]) == EXIT_CONFIG
    assert "data.path: required" in capsys.readouterr().err
    assert main(["--config", "tiny", "--set", "optim.lr"]) == EXIT_CONFIG
    assert "expected section.key=value" in capsys.readouterr().err


def test_print_config_shows_the_derived_deepspeed_config(capsys, shards, monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(name, value)
    assert main(["--config", "tiny", "--set", f"data.path={shards}", "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["grad_accum"] == 1 and printed["deepspeed"]["train_batch_size"] == 32


def test_every_mistake_in_the_model_section_is_reported_together(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(
            write(tmp_path, {"data": {"path": "x"}, "optim": {"total_steps": 10, "warmup_steps": 1}}),
            [
                "model.num_layers=0",
                "model.mixer=lstm",
                "model.dropout=1.5",
                "model.hidden_size=30",
                "model.num_heads=4",
                "model.pooling=max",
            ],
        )
    problems = caught.value.problems
    assert sorted(p.split(":")[0] for p in problems) == [
        "model.dropout",
        "model.mixer",
        "model.num_heads",
        "model.num_layers",
        "model.pooling",
    ], problems
    assert any("hidden_size (30) must be divisible by num_heads (4)" in p for p in problems), problems
