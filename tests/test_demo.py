"""The one-command demo end to end at its `ci` size: `python -m demo --size ci` in a subprocess (the real
data_pipeline build, the deepspeed launcher with 2 CPU processes, export --check, the fine-tuning sweep),
then the outputs, then a re-run that must reuse every stage, then a re-run that asks for other settings."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from hypermixer import ForMaskedLM

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 420  # ~40 s here; a fresh machine first compiles DeepSpeed's shared-memory op (~60 s)
STAGES = ("data", "pretrain-hypermixer", "release-hypermixer", "finetune-hypermixer")


def demo(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "demo", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # The whole tree, found before anything dies: torchrun starts each rank in a session of its
        # own, out of reach of killpg; an orphaned rank would hold our pipe open and hang us.
        for process in [*psutil.Process(proc.pid).children(recursive=True), psutil.Process(proc.pid)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        out, err = proc.communicate()
        pytest.fail(f"demo timed out after {TIMEOUT_S}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def markers(out: Path) -> dict[str, int]:
    """What each stage's completion rests on; a reused stage leaves them untouched."""
    files = [
        out / "data" / "manifest.json",
        out / "pretrain-hypermixer" / "run_status.json",
        out / "release-hypermixer" / "model.safetensors",
        *sorted(out.glob("finetune-hypermixer/runs/*/result.json")),
        *[out / stage / ".demo-stage.json" for stage in STAGES],
    ]
    return {str(f): f.stat().st_mtime_ns for f in files}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    result = demo("--size", "ci", "--out", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return out, result


def test_every_stage_runs_and_says_where_things_went(first_run):
    out, result = first_run
    for number, stage in enumerate(
        ["data", "pretrain hypermixer", "release hypermixer", "fine-tune hypermixer", "results"], start=1
    ):
        assert f"=== [{number}/5] {stage}" in result.stdout
    assert "deepspeed --num_gpus 2 pretrain/main.py" in result.stdout  # the real launcher, shown to the user
    assert "deepspeed.zero_optimization.stage=2" in result.stdout
    assert "check: validation loss" in result.stdout and ": OK" in result.stdout  # export --check passed
    assert "where everything went:" in result.stdout
    for name in ("data.log", "pretrain-hypermixer.log", "release-hypermixer.log", "finetune-hypermixer.log"):
        assert (out / "logs" / name).stat().st_size > 0


def test_outputs_are_sane(first_run):
    out, result = first_run
    status = json.loads((out / "pretrain-hypermixer" / "run_status.json").read_text())
    assert status["status"] == "completed" and status["step"] == status["total_steps"] == 20

    model = ForMaskedLM.from_pretrained(out / "release-hypermixer")
    assert model.config.mixer == "hypermixer" and model.config.hidden_size == 32
    assert (out / "release-hypermixer" / "tokenizer.json").is_file()

    results = json.loads((out / "results.json").read_text())
    rows = {(r["mixer"], r["init"]): r for r in results["rows"]}
    assert set(rows) == {("hypermixer", "pretrained"), ("hypermixer", "scratch")}
    pretrained = rows["hypermixer", "pretrained"]
    assert 0.0 <= pretrained["dev_accuracy"] <= 1.0 and pretrained["train_examples"] == 256
    assert pretrained["pretraining"]["steps"] == 20 and pretrained["pretraining"]["mlm_loss"] > 0
    assert rows["hypermixer", "scratch"]["pretraining"] is None
    assert 0.5 < results["majority_class_accuracy"] < 0.52  # 444 of the 872 dev sentences are positive

    table = (out / "results.md").read_text()
    assert table.count("| hypermixer |") == 2 and "SST-2 dev accuracy" in table
    assert "hypermixer  pretrained" in result.stdout  # the printed table
    for plot in ("pretraining.png", "finetuning.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_reuses_every_stage(first_run):
    out, _ = first_run
    before = markers(out)
    result = demo("--size", "ci", "--out", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    for stage in STAGES:
        assert f"reusing {out / stage}" in result.stdout or f"reusing {stage}" in result.stdout
    assert "deepspeed --num_gpus" not in result.stdout  # nothing was launched
    assert markers(out) == before
    assert (out / "results.md").is_file()


def test_other_settings_on_the_same_output_are_refused(first_run):
    out, _ = first_run
    result = demo("--size", "default", "--out", str(out))  # refused before any work starts
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr  # one line
    assert "made with other settings (--size ci)" in result.stderr and "--force" in result.stderr


def test_bad_arguments():
    result = demo("--mixer", "lstm")
    assert result.returncode == 2 and "invalid choice: 'lstm'" in result.stderr
