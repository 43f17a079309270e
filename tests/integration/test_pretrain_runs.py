"""pretrain end to end: the real DeepSpeed engine on 2 CPU processes over gloo, under torchrun and the
deepspeed launcher, on shards built by data_pipeline.

One uninterrupted ZeRO-2 run is the reference for: losses fall, exact resume, export, wandb.
ZeRO-0 and ZeRO-3 runs of the same config must match it within LOSS_TOLERANCE (fp32 on CPU).
Every launch runs in its own process group under a timeout: a stalled rank would otherwise hang
its peer for gloo's 30 minutes.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch

from common.net import free_port
from data_pipeline.build import build
from data_pipeline.config import BuildConfig
from hypermixer import ForMaskedLM
from pretrain import checkpoint as ckpt
from pretrain.export import check_release, consolidated_weights, export
from pretrain.main import EXIT_CONFIG, EXIT_DIVERGED
from pretrain.metrics import read_metrics
from pretrain.sample_audit import audit
from pretrain.sample_ids import read_sample_ids

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
MAIN = ROOT / "pretrain" / "main.py"
FAULT_MAIN = Path(__file__).resolve().parent / "fault_main.py"  # main.py with PRETRAIN_FAULT's fault injected
LAUNCH_TIMEOUT_S = 420  # a fresh machine compiles DeepSpeed's shared-memory op (~50-70 s) in the first run
LOSS_TOLERANCE = 1e-5  # fp32 on CPU: ZeRO stages differ only in reduction order
STEPS = 16
COMMON = [
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.intermediate_size=64",
    "model.dropout=0.1",  # dropout on: exact resume needs the RNG state restored too
    f"optim.total_steps={STEPS}",
    "optim.warmup_steps=2",
    "optim.lr=3e-3",
    "batch.global_batch_size=16",
    "batch.micro_batch_size=4",  # 2 ranks x 4 x 2 accumulation steps
    "data.num_workers=2",
    "data.shuffle_shards=2",
    "logging.every_steps=1",
    "eval.every_steps=8",
    "checkpoint.every_steps=4",
    "checkpoint.keep_last=2",
    "logging.wandb.mode=disabled",
]


def corpus(lines: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    nouns = "cat dog bird fish horse cow sheep mouse lion tiger bear wolf".split()
    verbs = "sees chases likes follows finds watches".split()
    return (
        "\n".join(
            " ".join(["the", rng.choice(nouns), rng.choice(verbs), "the", rng.choice(nouns), "."] * rng.randint(1, 3))
            for _ in range(lines)
        )
        + "\n"
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("pretrain_shards")
    (root / "corpus.txt").write_text(corpus(260))
    # ~200 train sequences: each rank's epoch (2 workers x 2 ranks) ends mid-run, so resume crosses an epoch;
    # blocks of 16 sequences, so that streams start inside shards and inside blocks
    build(
        BuildConfig(
            inputs=[str(root / "corpus.txt")],
            out_dir=str(root / "out"),
            vocab_size=80,
            seq_len=16,
            shard_mb=0.01,
            block_sequences=16,
            validation_fraction=0.15,
        ),
        workers=1,
        progress=False,
    )
    return str(root / "out")


@dataclass
class Launch:
    rc: int
    output: str
    seconds: float


def launch(
    run_dir: Path,
    shards: str,
    *extra: str,
    launcher: str = "torchrun",
    fault: str | None = None,
    resume: str | None = None,
    nproc: int = 2,
    timeout: float = LAUNCH_TIMEOUT_S,
) -> Launch:
    sets = [f"data.path={shards}", f"output_dir={run_dir}", *COMMON, *extra]
    script = FAULT_MAIN if fault else MAIN
    tail = ["--config", "tiny", "--set", *sets] + (["--resume", resume] if resume else [])
    if launcher == "torchrun":
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(script),
            *tail,
        ]
    elif launcher == "deepspeed":
        command = [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            str(nproc),
            "--master_port",
            str(free_port()),
            str(script),
            *tail,
        ]
    else:
        command = [sys.executable, *(["-m", "pretrain.main"] if script == MAIN else [str(script)]), *tail]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env.pop("PRETRAIN_FAULT", None)
    if fault:
        env["PRETRAIN_FAULT"] = fault
    began = time.monotonic()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # The whole tree, found before anything dies: torchrun starts each rank in a session of its
        # own, out of reach of killpg; an orphaned rank would hold our pipe open and hang us.
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        output, _ = proc.communicate()
        pytest.fail(f"launch timed out after {timeout}s:\n{output[-4000:]}")
    return Launch(proc.returncode, output, time.monotonic() - began)


def losses(run_dir: Path, kind: str) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["accuracy"]) for r in read_metrics(run_dir) if r["kind"] == kind]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "run_status.json").read_text())


def completed(run_dir: Path, result: Launch) -> Path:
    assert result.rc == 0, result.output[-4000:]
    assert status(run_dir)["status"] == "completed"
    return run_dir


@pytest.fixture(scope="module")
def zero2(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    return completed(
        run_dir, launch(run_dir, shards, "deepspeed.zero_optimization.stage=2", "logging.wandb.mode=offline")
    )


@pytest.fixture(scope="module")
def zero3(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero3") / "run"
    return completed(run_dir, launch(run_dir, shards, "deepspeed.zero_optimization.stage=3"))


@pytest.fixture(scope="module")
def zero0(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero0") / "run"  # the deepspeed launcher (passes --local_rank)
    return completed(run_dir, launch(run_dir, shards, "deepspeed.zero_optimization.stage=0", launcher="deepspeed"))


def test_zero2_and_zero3_losses_fall(zero2, zero3):
    for run_dir in (zero2, zero3):
        train, evals = losses(run_dir, "train"), losses(run_dir, "eval")
        assert [s for s, _, _ in train] == list(range(1, STEPS + 1)) and [s for s, _, _ in evals] == [8, 16]
        first, last = sum(loss for _, loss, _ in train[:4]) / 4, sum(loss for _, loss, _ in train[-4:]) / 4
        assert last < first - 0.3, train
        assert evals[1][1] < evals[0][1], evals


def test_zero0_and_zero3_agree_with_zero2(zero0, zero2, zero3):
    reference = losses(zero2, "train") + losses(zero2, "eval")
    for run_dir in (zero0, zero3):
        other = losses(run_dir, "train") + losses(run_dir, "eval")
        assert [s for s, _, _ in other] == [s for s, _, _ in reference]
        worst = max(abs(a[1] - b[1]) for a, b in zip(reference, other))
        assert worst < LOSS_TOLERANCE, (run_dir, worst)


def test_stop_signal_kill_and_resume_reproduce_the_uninterrupted_run(shards, zero2, tmp_path):
    run_dir = tmp_path / "run"
    stage = "deepspeed.zero_optimization.stage=2"
    # 1. SIGUSR1 to rank 1 only, after step 5: every rank agrees at step 6, checkpoints, exits 0
    first = launch(run_dir, shards, stage, fault="signal:1:5:USR1")
    assert first.rc == 0, first.output[-4000:]
    stopped = status(run_dir)
    assert stopped["status"] == "stopped" and stopped["step"] == 6
    assert Path(stopped["checkpoint"]).name == ckpt.tag_for(6) and ckpt.is_complete(Path(stopped["checkpoint"]))
    assert "stopped by" in first.output and "at step 6" in first.output
    # 2. without --resume the checkpoints are not overwritten
    refused = launch(run_dir, shards, stage)
    assert refused.rc != 0 and "--resume auto" in refused.output
    # 3. resume, then rank 1 is SIGKILLed after step 10: the launcher exits non-zero instead of hanging
    second = launch(run_dir, shards, stage, resume="auto", fault="kill:1:10")
    assert second.rc != 0, second.output[-4000:]
    assert second.seconds < 120, f"the surviving rank took {second.seconds:.0f}s to go down"
    crashed = status(run_dir)  # rank 0 survived the kill long enough to say so
    assert crashed["status"] in ("killed", "failed") and crashed["step"] == 10 and crashed["reason"], crashed
    print(
        f"SIGKILL of rank 1 after step 10: the launcher exited rc {second.rc} after {second.seconds:.1f}s "
        f"(start-up included); run_status: {crashed['status']}: {crashed['reason']}"
    )
    assert ckpt.latest_checkpoint(run_dir / "checkpoints").name == ckpt.tag_for(8)
    # 4. resume again from step 8: the same losses, bit for bit, as the run that was never interrupted
    third = launch(run_dir, shards, stage, resume="auto")
    completed(run_dir, third)
    assert "resuming from" in third.output and ckpt.tag_for(8) in third.output
    assert losses(run_dir, "train") == losses(zero2, "train")
    assert losses(run_dir, "eval") == losses(zero2, "eval")
    kept = sorted(p.name for p in ckpt.checkpoint_folders(run_dir / "checkpoints"))
    assert kept == [ckpt.tag_for(12), ckpt.tag_for(16)]  # keep_last=2


def test_run_status_is_current_while_the_run_goes_and_counts_restarts(shards, tmp_path):
    run_dir = tmp_path / "run"
    short = ("deepspeed.zero_optimization.stage=2", "optim.total_steps=8")
    killed = launch(run_dir, shards, *short, fault="kill:0:6", launcher="module")  # no last word from rank 0
    assert killed.rc != 0, killed.output[-3000:]
    record = status(run_dir)  # as rank 0 wrote it last: at step 5's log line, after step 4's checkpoint
    assert record["status"] == "running" and record["step"] == 5 and record["restarts"] == 0, record
    assert Path(record["checkpoint"]).name == ckpt.tag_for(4) and ckpt.is_complete(Path(record["checkpoint"]))
    resumed = launch(run_dir, shards, *short, resume="auto", launcher="module")
    completed(run_dir, resumed)
    record = status(run_dir)
    assert record["step"] == 8 and record["restarts"] == 1 and Path(record["checkpoint"]).name == ckpt.tag_for(8)


@pytest.mark.parametrize("stage_fixture", ["zero2", "zero3", "zero0"])
def test_export_reproduces_the_training_engine(stage_fixture, request, tmp_path):
    run_dir = request.getfixturevalue(stage_fixture)
    release = export(run_dir, tmp_path / "release")
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md", "training.json"} <= {
        p.name for p in release.iterdir()
    }
    card = (release / "README.md").read_text()
    assert "hypermixer" in card and "manifest sha256" in card and f"steps: {STEPS}" in card
    result = check_release(release)  # same validation sequences and masks as the engine's last evaluation
    assert result["ok"], result
    assert abs(result["loss"] - result["logged_loss"]) < LOSS_TOLERANCE
    model = ForMaskedLM.from_pretrained(release)
    reference = export(request.getfixturevalue("zero2"), tmp_path / "reference")
    for name, tensor in ForMaskedLM.from_pretrained(reference).state_dict().items():
        assert torch.allclose(model.state_dict()[name], tensor, atol=1e-5), name  # every stage, the same weights
    weights = consolidated_weights(
        ckpt.latest_checkpoint(run_dir / "checkpoints"),
        ckpt.read_state(ckpt.latest_checkpoint(run_dir / "checkpoints"))["zero_stage"],
    )
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def wandb_history(run_dir: Path) -> list[dict]:
    """History rows of an offline run, read from its .wandb file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2

    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    data = files[0].read_bytes()
    assert data[:4] == b":W&B"
    rows, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                )
    return rows


def test_wandb_offline_run_holds_the_logged_metrics(zero2):
    rows = wandb_history(zero2)
    logged = {row["_step"]: row for row in rows}
    for step, loss, accuracy in losses(zero2, "train"):
        assert logged[step]["train/loss"] == pytest.approx(loss) and logged[step]["train/accuracy"] == pytest.approx(
            accuracy
        )
        for key in ("train/lr", "train/grad_norm", "train/tokens_per_s", "train/samples_per_s", "train/memory_gib"):
            assert key in logged[step], (key, logged[step])
    for step, loss, _ in losses(zero2, "eval"):
        assert logged[step]["eval/loss"] == pytest.approx(loss)


def test_config_mistake_stops_every_rank_with_one_message(shards, tmp_path):
    result = launch(tmp_path / "run", shards, "batch.global_batch_size=12")  # 12 is not a multiple of 4 x 2 ranks
    assert result.rc != 0
    message = "global_batch_size (12) must be a multiple of micro_batch_size (4) x world size (2) = 8"
    assert result.output.count(message) == 1, result.output[-3000:]
    assert not (tmp_path / "run").exists()  # nothing ran


def test_a_slow_rank_0_still_reports_a_mistake_every_rank_found(tmp_path):
    # torchrun kills every rank when the first one exits; rank 1 must not end the job before rank 0 printed
    script = tmp_path / "fail.py"
    script.write_text(
        "import os, sys, time\n"
        "from pretrain.main import report_failure\n"
        "if os.environ['RANK'] == '0':\n"
        "    time.sleep(3)  # a rank 0 slowed down by a loaded machine\n"
        "report_failure(ValueError('the same mistake on every rank'))\n"
        "sys.exit(2)\n"
    )
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    result = subprocess.run(
        command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert output.count("pretrain: the same mistake on every rank") == 1, output[-3000:]
    assert "(rank 1)" not in output


def test_non_finite_losses_are_dropped_then_abort(shards, tmp_path):
    run_dir = tmp_path / "run"
    result = launch(
        run_dir,
        shards,
        "optim.lr=1e30",
        "optim.grad_clip=0",
        "optim.warmup_steps=0",
        "train.max_nonfinite_in_a_row=3",
        "data.num_workers=0",
        launcher="python",
    )
    assert result.rc == EXIT_DIVERGED, result.output[-3000:]
    assert result.output.count("non-finite loss on some rank: micro-batch dropped") == 3
    assert status(run_dir)["status"] == "diverged"
    assert EXIT_CONFIG != EXIT_DIVERGED


def test_compiled_pretraining_matches_eager(shards, tmp_path):
    # train.compile=true: DeepSpeed's engine.compile() on the model with static MLM slots, 20 steps, 1 process
    sets = (
        "optim.total_steps=20",
        "model.dropout=0.0",
        "data.num_workers=0",
        "eval.every_steps=0",
        "checkpoint.every_steps=0",
    )
    eager = completed(tmp_path / "eager", launch(tmp_path / "eager", shards, *sets, launcher="python", nproc=1))
    # inductor compiles forward and backward on CPU first: minutes on a loaded 2-core machine
    compiled_run = launch(
        tmp_path / "compiled", shards, *sets, "train.compile=true", launcher="python", nproc=1, timeout=600
    )
    compiled = completed(tmp_path / "compiled", compiled_run)
    reference, other = losses(eager, "train"), losses(compiled, "train")
    assert [s for s, _, _ in other] == [s for s, _, _ in reference] == list(range(1, 21))
    worst = max(abs(a[1] - b[1]) for a, b in zip(reference, other))
    assert worst < 1e-4, (worst, reference, other)


def test_compile_where_it_cannot_work_is_one_line_before_training(shards, tmp_path):
    env_cxx = os.environ.get("CXX")
    os.environ["CXX"] = "no-such-c++-compiler"
    try:
        result = launch(tmp_path / "run", shards, "train.compile=true", launcher="python", nproc=1)
    finally:
        os.environ.pop("CXX") if env_cxx is None else os.environ.__setitem__("CXX", env_cxx)
    assert result.rc == EXIT_CONFIG, result.output[-3000:]
    assert (
        "train.compile: torch.compile on CPU needs a C++ compiler (no-such-c++-compiler: none found); "
        "set train.compile=false" in result.output
    )
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_bf16_pretraining_tracks_fp32_and_fp16_is_refused_in_one_line_where_unsupported(shards, tmp_path):
    sets = ("model.dropout=0.0", "data.num_workers=0", "eval.every_steps=0", "checkpoint.every_steps=0")
    fp32 = completed(tmp_path / "fp32", launch(tmp_path / "fp32", shards, *sets, launcher="python"))
    bf16 = completed(tmp_path / "bf16", launch(tmp_path / "bf16", shards, *sets, "precision=bf16", launcher="python"))
    reference, other = losses(fp32, "train"), losses(bf16, "train")
    assert all(math.isfinite(loss) for _, loss, _ in other)
    worst = max(abs(a[1] - b[1]) for a, b in zip(reference, other))
    assert worst < 2e-2, (worst, reference, other)  # bf16 weights and activations, fp32 optimizer state
    fp16 = launch(tmp_path / "fp16", shards, *sets, "precision=fp16", launcher="python")
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().is_fp16_supported():
        completed(tmp_path / "fp16", fp16)
        assert all(math.isfinite(loss) for _, loss, _ in losses(tmp_path / "fp16", "train"))
    else:  # DeepSpeed's CPU accelerator: the model under fp16 autocast is covered in tests/test_models.py
        assert fp16.rc == EXIT_CONFIG and "precision: fp16 is not supported on cpu; use bf16 or fp32" in fp16.output


# Resume on another world size: 2 ranks -> 1 -> 2 under ZeRO 1, 2 and 3, against one uninterrupted 2-rank run.
# An epoch of the fixture is 16 steps (16 streams x 4 micro-batches of 4 sequences, 16 a step): 18 steps use
# every sequence of epoch 0 once and cross into epoch 1 in the last launch. Dropout off: the resumed run must
# follow the uninterrupted one to fp32 reduction-order noise, which it cannot if the optimizer state were lost.
RESIZE_STEPS = 18
RESIZE = (
    f"optim.total_steps={RESIZE_STEPS}",
    "model.dropout=0.0",
    "metrics.sample_ids=true",
    "eval.every_steps=0",
    "checkpoint.every_steps=0",
)


@pytest.fixture(scope="module")
def unresized(shards, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("unresized") / "run"
    return completed(run_dir, launch(run_dir, shards, *RESIZE, "deepspeed.zero_optimization.stage=2"))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_on_another_world_size_continues_the_same_samples_and_losses(shards, unresized, stage, tmp_path):
    run_dir, sets = tmp_path / "run", (*RESIZE, f"deepspeed.zero_optimization.stage={stage}")
    first = launch(run_dir, shards, *sets, fault="signal:0:5:USR1")  # 2 ranks: steps 1-6
    assert first.rc == 0 and status(run_dir)["step"] == 6, first.output[-4000:]
    shrunk = launch(run_dir, shards, *sets, resume="auto", nproc=1, fault="signal:0:11:USR1")  # 1 rank: 7-12
    assert shrunk.rc == 0 and status(run_dir)["step"] == 12, shrunk.output[-4000:]
    assert "resume: changed world size: 2 -> 1" in shrunk.output
    assert "resume: re-partitioning the optimizer state of step_00000006 from 2 to 1 ranks" in shrunk.output
    grown = launch(run_dir, shards, *sets, resume="auto")  # 2 ranks again: 13-18, into epoch 1
    completed(run_dir, grown)
    assert grown.output.count("resume: changed world size: 1 -> 2") == 1, grown.output[-4000:]  # rank 0 only

    counted = audit(run_dir)  # python -m pretrain.sample_audit: the log against pretrain.data.global_order
    assert (counted.steps, counted.sequences, counted.ordered) == (RESIZE_STEPS, RESIZE_STEPS * 16, 256)
    assert (counted.epoch_sequences, counted.repeated, counted.missing, counted.in_order) == (256, 0, 0, True)
    assert read_sample_ids(run_dir) == read_sample_ids(unresized)

    reference, other = (
        losses(unresized, "train") + losses(unresized, "eval"),
        losses(run_dir, "train") + losses(run_dir, "eval"),
    )
    assert [s for s, _, _ in other] == [s for s, _, _ in reference]
    worst = max(abs(a[1] - b[1]) for a, b in zip(reference, other))
    print(
        f"ZeRO-{stage}, 2 -> 1 -> 2 ranks: {counted.line()}; worst loss difference from the uninterrupted "
        f"2-rank run {worst:.2e}"
    )
    assert worst < LOSS_TOLERANCE, (worst, reference, other)  # as between ZeRO stages
