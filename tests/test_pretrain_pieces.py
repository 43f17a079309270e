"""pretrain's small parts: lr schedule, weight-decay groups, checkpoint folders, signals, metrics and MFU."""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from common.optim import lr_factor, param_groups
from hypermixer import EncoderConfig, ForMaskedLM, flops_per_token
from pretrain import checkpoint as ckpt
from pretrain.metrics import MetricsLog, default_peak_tflops, progress_line, read_metrics, throughput
from pretrain.startup import rank_seed


def _touch(path: Path) -> None:
    path.touch()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_checkpoint_loads_never_unpickle_code_even_where_deepspeed_asks_for_weights_only_false(tmp_path):
    # The loader engine.load_checkpoint reads every checkpoint file with (it turns weights-only mode off).
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    deepspeed_load = TorchCheckpointEngine().load
    marker = tmp_path / "code_ran"
    tampered = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"weights": torch.ones(2), "payload": _RunsCodeWhenUnpickled(marker)}, tampered)
    with pytest.raises(ckpt.UnsafeCheckpointError) as raised:
        with ckpt.weights_only_loads(tampered):
            deepspeed_load(str(tampered))
    assert not marker.exists()
    message = str(raised.value)
    assert "\n" not in message and str(tampered) in message and "_touch" in message
    assert ckpt.FORCE_WEIGHTS_ONLY not in os.environ  # restored for the rest of the process

    # The DeepSpeed records a real ZeRO checkpoint holds are plain data and load.
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    plain = tmp_path / "plain.pt"
    scaler = DynamicLossScaler(
        init_scale=2.0**8, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False
    )
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum(3)}, plain)
    with ckpt.weights_only_loads(plain):
        loaded = deepspeed_load(str(plain))
    assert loaded["zero_stage"] == ZeroStageEnum(3) and loaded["loss_scaler"].cur_scale == 2.0**8


def test_lr_schedule_warms_up_then_decays():
    linear = [lr_factor(s, warmup=4, total=12, decay="linear", min_ratio=0.1) for s in range(12)]
    assert linear[:4] == [0.25, 0.5, 0.75, 1.0]  # the first step already trains
    assert linear[4] == 1.0 and linear[-1] == pytest.approx(1.0 - 0.9 * 7 / 8)
    assert all(a >= b for a, b in zip(linear[3:], linear[4:]))
    assert lr_factor(12, 4, 12, "linear", 0.1) == pytest.approx(0.1)
    cosine = [lr_factor(s, 0, 10, "cosine", 0.0) for s in (0, 5, 10)]
    assert cosine == pytest.approx([1.0, 0.5, 0.0])
    assert lr_factor(100, 0, 10, "constant", 0.0) == 1.0


@pytest.mark.parametrize("mixer", ["hypermixer", "transformer"])
def test_weight_decay_skips_biases_and_norms_only(mixer):
    model = ForMaskedLM(
        EncoderConfig(
            vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32, max_seq_len=8, mixer=mixer
        )
    )
    decay, no_decay = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    exempt = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert exempt | decayed == set(names.values()) and not exempt & decayed
    assert all(n.endswith("bias") or "norm" in n for n in exempt)
    assert "encoder.embeddings.token.weight" in decayed and "output_bias" in exempt
    if mixer == "hypermixer":
        assert any("fc1_bias" in n for n in exempt) and any("fc1_weight" in n for n in decayed)


def test_rank_seeds_differ_per_rank():
    assert len({rank_seed(0, r) for r in range(64)}) == 64 and rank_seed(0, 1) != rank_seed(1, 1)


def make_checkpoint(root, step, complete=True):
    path = root / ckpt.tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"")
    if complete:
        (path / ckpt.STATE_FILE).write_text(json.dumps({"format_version": ckpt.STATE_FORMAT_VERSION, "step": step}))
    return path


def test_latest_is_the_newest_complete_checkpoint(tmp_path):
    assert ckpt.latest_checkpoint(tmp_path) is None
    make_checkpoint(tmp_path, 4)
    newest = make_checkpoint(tmp_path, 8)
    make_checkpoint(tmp_path, 12, complete=False)  # killed while saving
    assert ckpt.latest_checkpoint(tmp_path) == newest  # no pointer: a scan
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.tag_for(12))  # a pointer to an incomplete one is not trusted
    assert ckpt.latest_checkpoint(tmp_path) == newest
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.tag_for(4))
    assert ckpt.latest_checkpoint(tmp_path) == tmp_path / ckpt.tag_for(4)
    assert ckpt.resolve_checkpoint(tmp_path / ckpt.tag_for(8)) == newest
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path / ckpt.tag_for(12))
    assert ckpt.read_state(newest)["step"] == 8


def test_prune_keeps_the_last_k_and_drops_interrupted_saves(tmp_path):
    for step in (2, 4, 6, 8):
        make_checkpoint(tmp_path, step)
    make_checkpoint(tmp_path, 5, complete=False)
    (tmp_path / "zero_to_fp32.py").write_text("")
    ckpt.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [ckpt.tag_for(6), ckpt.tag_for(8), "zero_to_fp32.py"]


def test_stop_signals_set_a_flag_and_restore_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    with ckpt.StopSignals() as signals:
        assert signals.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
        assert signals.received == signal.SIGUSR1 and signals.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_throughput_and_mfu_arithmetic():
    config = EncoderConfig.preset("base", vocab_size=30522)
    fpt = flops_per_token(config, 128, mlm_fraction=0.15)
    speed = throughput(
        tokens=2 * 1_000_000,
        samples=2 * 1_000_000 // 128,
        seconds=2.0,
        world_size=8,
        flops_per_token=fpt,
        peak_tflops=989.0,
    )
    assert speed["tokens_per_s"] == 1_000_000 and speed["samples_per_s"] == pytest.approx(1_000_000 / 128, rel=1e-3)
    assert speed["tflops_per_device"] == pytest.approx(1_000_000 * fpt / 8 / 1e12)
    assert speed["mfu"] == pytest.approx(speed["tflops_per_device"] / 989.0)
    assert throughput(100, 1, 1.0, 1, fpt, None)["mfu"] is None  # no peak, no MFU (CPU)
    assert default_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert default_peak_tflops("NVIDIA H100 80GB HBM3", "fp32") is None
    assert default_peak_tflops(None, "bf16") is None


def test_metrics_log_cuts_history_back_to_the_resumed_step(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        "".join(json.dumps({"kind": "train", "step": s, "loss": 1.0}) + "\n" for s in range(1, 7))
        + '{"kind": "train", "st'
    )  # a torn line from a killed writer
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
    log = MetricsLog(tmp_path, "run", SimpleNamespace(mode="disabled"), {}, "abc", resumed_step=4, total_steps=10)
    record = {
        "kind": "train",
        "step": 5,
        "loss": 2.0,
        "accuracy": 0.5,
        "lr": 1e-3,
        "grad_norm": 1.0,
        "tokens_per_s": 1000.0,
        "samples_per_s": 10.0,
        "tflops_per_device": 0.1,
        "mfu": None,
        "memory_gib": 1.0,
        "eta_s": 30.0,
    }
    log.log(record)
    log.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [
        (1, 1.0),
        (2, 1.0),
        (3, 1.0),
        (4, 1.0),
        (5, 2.0),
    ]
    assert "step  5/10 | loss 2.0000 | acc 0.5000" in capsys.readouterr().out
    fresh = MetricsLog(tmp_path, "run", SimpleNamespace(mode="disabled"), {}, "abc", resumed_step=None, total_steps=10)
    fresh.close()
    assert read_metrics(tmp_path) == []  # a fresh start does not inherit an old history


def test_progress_line_shows_mfu_only_when_known():
    record = {
        "kind": "train",
        "step": 3,
        "loss": 1.0,
        "accuracy": 0.1,
        "lr": 1e-4,
        "grad_norm": None,
        "tokens_per_s": 5e4,
        "samples_per_s": 10.0,
        "tflops_per_device": 300.0,
        "mfu": 0.3,
        "memory_gib": 2.0,
        "eta_s": 61.0,
    }
    line = progress_line(record, 100)
    assert "MFU 30.0%" in line and "gnorm" not in line and "eta 01:01" in line
    assert "MFU" not in progress_line({**record, "mfu": None}, 100)
    assert math.isfinite(float(line.split("loss ")[1].split()[0]))


def test_check_files_names_a_truncated_file_of_any_kind_and_older_complete_lists_the_fallbacks(tmp_path):
    from safetensors.torch import save_file

    def readable(step: int) -> Path:
        path = tmp_path / ckpt.tag_for(step)
        path.mkdir()
        (path / ckpt.STATE_FILE).write_text(json.dumps({"format_version": ckpt.STATE_FORMAT_VERSION, "step": step}))
        torch.save({"module": {"w": torch.ones(64)}}, path / "mp_rank_00_model_states.pt")
        save_file({"cpu": torch.get_rng_state()}, str(path / "rng_rank00000.safetensors"))
        return path

    for name in (ckpt.STATE_FILE, "mp_rank_00_model_states.pt", "rng_rank00000.safetensors"):
        path = readable(4)
        assert ckpt.check_files(path) is None
        file = path / name
        os.truncate(file, file.stat().st_size // 2)  # a write cut short
        problem = ckpt.check_files(path)
        assert problem is not None and problem.startswith(f"{name}: unreadable (") and "\n" not in problem, problem
        for leftover in path.iterdir():
            leftover.unlink()
        path.rmdir()
    # with the files' sizes recorded (what save() does): a file that is gone, or cut short, is named too
    for name in ("mp_rank_00_model_states.pt", "rng_rank00000.safetensors"):
        path = readable(4)
        state = json.loads((path / ckpt.STATE_FILE).read_text())
        (path / ckpt.STATE_FILE).write_text(json.dumps({**state, "files": ckpt.file_sizes(path)}))
        assert ckpt.check_files(path) is None
        size = (path / name).stat().st_size
        (path / name).unlink()
        assert ckpt.check_files(path) == f"{name}: missing"
        if name.endswith(".pt"):  # replaced by another file that reads
            torch.save({"module": {"w": torch.ones(16)}}, path / name)
        else:
            save_file({"cpu": torch.zeros(4, dtype=torch.uint8)}, str(path / name))
        now = (path / name).stat().st_size
        assert (
            now != size and ckpt.check_files(path) == f"{name}: {now:,} bytes, where the checkpoint recorded {size:,}"
        )
        for leftover in path.iterdir():
            leftover.unlink()
        path.rmdir()
    for step in (4, 8, 12):
        readable(step)
    make_checkpoint(tmp_path, 10, complete=False)
    assert ckpt.older_complete(tmp_path / ckpt.tag_for(12)) == [tmp_path / ckpt.tag_for(8), tmp_path / ckpt.tag_for(4)]
    assert ckpt.older_complete(tmp_path / ckpt.tag_for(4)) == []


def test_run_status_carries_restarts_and_the_last_fault_over_restarts_before_the_first_checkpoint(tmp_path):
    from pretrain.run_status import RunStatus, read_run_status

    first = RunStatus(tmp_path, 16, 0, None, read_run_status(tmp_path), resumed=True)
    first.step = 3
    first.write("running")  # then SIGKILLed: nobody writes again
    second = RunStatus(tmp_path, 16, 0, None, read_run_status(tmp_path), resumed=True)
    second.write("running")
    record = read_run_status(tmp_path)
    assert record["restarts"] == 1 and record["step"] == 0 and record["checkpoint"] is None, record
    assert "ended without a word after step 3" in record["last_fault"], record
    second.write("failed", reason="RuntimeError: Connection closed by peer")
    third = RunStatus(tmp_path, 16, 4, tmp_path / ckpt.tag_for(4), read_run_status(tmp_path), resumed=True)
    third.write("running")
    record = read_run_status(tmp_path)
    assert record["restarts"] == 2 and record["last_fault"] == "RuntimeError: Connection closed by peer", record
    third.write("stopped", signal="SIGTERM")  # a preemption is no fault: the last fault stays
    fourth = RunStatus(tmp_path, 16, 4, tmp_path / ckpt.tag_for(4), read_run_status(tmp_path), resumed=True)
    fourth.write("running")
    assert read_run_status(tmp_path)["last_fault"] == "RuntimeError: Connection closed by peer"
    fresh = RunStatus(tmp_path, 16, 0, None, read_run_status(tmp_path), resumed=False)  # --resume none
    fresh.write("running")
    record = read_run_status(tmp_path)
    assert record["restarts"] == 0 and record["last_fault"] is None, record


def test_a_resume_on_a_world_size_that_cannot_serve_the_streams_is_one_line_and_touches_nothing(tmp_path):
    from pretrain.config import ConfigError, load_config
    from pretrain.startup import check_resume_world_size

    config = load_config(
        "tiny", [f"data.path={tmp_path}", f"output_dir={tmp_path}", "data.num_workers=2", "data.streams=16"]
    )
    check_resume_world_size(config, 3, "auto")  # nothing to resume: a fresh run's check is resolve's
    step = make_checkpoint(config.checkpoint_dir, 8)
    before = sorted(p.name for p in config.checkpoint_dir.rglob("*"))
    for world_size in (1, 2, 4, 8):
        check_resume_world_size(config, world_size, "auto")
    check_resume_world_size(config, 3, "none")
    with pytest.raises(ConfigError) as caught:
        check_resume_world_size(config, 3, "auto")
    line = str(caught.value)
    assert "\n" not in line and line.startswith(f"cannot resume {step} on 3 ranks: data.streams (16) must be"), line
    assert "on 1, 2, 4, 8 ranks (with data.num_workers=2)" in line and "untouched" in line, line
    assert sorted(p.name for p in config.checkpoint_dir.rglob("*")) == before
