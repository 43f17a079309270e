"""The demo's stages. Each one runs the project's own command line (printed, so it can be copied),
streams its output to the terminal and to `<out>/logs/<stage>.log`, and leaves a stamp next to
its output: the settings it ran with, the ids of the stamps it read from, and `done` once the
stage's own completion marker is there. A re-run reuses a stage whose stamp is done, whose
settings match and whose inputs are unchanged."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from common.net import free_port
from demo.sizes import CORPUS, GLUE_DIR, TASK, Size

ROOT = Path(__file__).resolve().parents[1]
STAMP = ".demo-stage.json"


class DemoError(Exception):
    """A problem the user can act on; printed as one line."""


@dataclass
class Stage:
    """One stage's output folder and what it needs to know about its run."""

    name: str  # also the log file's name
    out: Path
    settings: dict[str, Any]
    inputs: dict[str, str]  # name of an upstream stage -> the id of its stamp

    @property
    def stamp_path(self) -> Path:
        return self.out / STAMP

    def stamp(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.stamp_path.read_text())
        except FileNotFoundError:
            return None
        except json.JSONDecodeError:
            return None  # torn by a crash: treated as never finished

    def write_stamp(self, status: str, **extra: Any) -> dict[str, Any]:
        """Atomically: a reader sees the old stamp or the new one, never half of one."""
        values = {
            "stage": self.name,
            "status": status,
            "id": uuid.uuid4().hex,
            "settings": self.settings,
            "inputs": self.inputs,
            **extra,
        }
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.stamp_path, values)
        return values


def header(number: int, total: int, title: str) -> None:
    print(f"\n=== [{number}/{total}] {title} ===", flush=True)


def display_path(path: Path | str) -> str:
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def decide(stage: Stage, complete: bool, force: bool) -> dict[str, Any] | None:
    """The stamp to reuse, or None when the stage must run (after clearing what has to go)."""
    stamp = stage.stamp()
    if force:
        remove(stage.out)
        return None
    if stamp is None:
        if stage.out.exists() and any(stage.out.iterdir()):
            raise DemoError(
                f"{display_path(stage.out)} exists but was not written by this demo; "
                "re-run with --force to replace it, or choose another --out"
            )
        return None
    if stamp.get("settings") != stage.settings:
        old = stamp.get("settings", {}).get("size", "?")
        raise DemoError(
            f"{display_path(stage.out)} was made with other settings (--size {old}); "
            f"re-run with --force to redo it, or choose another --out"
        )
    if stamp.get("inputs") != stage.inputs:
        print(f"{stage.name}: its input was redone since; redoing it", flush=True)
        remove(stage.out)
        return None
    if stamp.get("status") == "done" and complete:
        return stamp
    return None  # started but not finished: the stage's own resume continues it


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)


def reused(stage: Stage, stamp: dict[str, Any]) -> dict[str, Any]:
    seconds = stamp.get("seconds")
    took = f" (it took {seconds:.0f} s)" if isinstance(seconds, (int, float)) else ""
    print(f"reusing {display_path(stage.out)}: finished earlier{took}; --force redoes it", flush=True)
    return {**stamp, "reused": True}


def run_command(argv: list[str], shown: str, log: Path, env: dict[str, str] | None = None) -> None:
    """Run one command, its output on the terminal as it comes (progress bars too) and in `log`."""
    print(f"$ {shown}", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as sink:
        sink.write(f"\n$ {shown}\n".encode())
        # Same process group as the demo: Ctrl-C in the terminal reaches the command (and its ranks) too.
        proc = subprocess.Popen(
            argv, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                sink.write(chunk)
        finally:
            rc = proc.wait()
    if rc != 0:
        raise DemoError(f"the command failed (exit code {rc}); its output is above and in {display_path(log)}")


def show(argv: list[str]) -> str:
    """A command line to print: absolute paths (also in key=path) shortened to the working directory."""

    def short(arg: str) -> str:
        key, sep, value = arg.rpartition("=")
        return key + sep + display_path(value) if value.startswith("/") else arg

    return shlex.join(short(a) for a in argv)


def _progress_flag() -> list[str]:
    return ["--progress"] if sys.stdout.isatty() else ["--no-progress"]


# ------------------------------------------------------------------------------------------ stages


def build_data(out: Path, size: Size, force: bool, logs: Path) -> dict[str, Any]:
    """Train the WordPiece tokenizer on the shipped corpus and pack it into webdataset shards."""
    args = [str(CORPUS), "--out", str(out), *size.build_args]
    stage = Stage("data", out, {"size": size.name, "args": list(size.build_args)}, {})
    stamp = decide(stage, (out / "manifest.json").is_file(), force)
    if stamp:
        return reused(stage, stamp)
    stage.write_stamp("running")
    began = time.monotonic()
    tail = ["-m", "data_pipeline", "build", *args, "--workers", "2"]
    run_command([sys.executable, *tail], show(["python", *tail]), logs / "data.log")
    return stage.write_stamp("done", seconds=time.monotonic() - began)


def pretrain(out: Path, data: Path, data_id: str, mixer: str, size: Size, force: bool, logs: Path) -> dict[str, Any]:
    """Masked-LM pretraining with the deepspeed launcher: 2 processes on CPU (gloo), ZeRO-2."""
    sets = [f"model.mixer={mixer}", "deepspeed.zero_optimization.stage=2", *size.pretrain_sets]
    stage = Stage(f"pretrain-{mixer}", out, {"size": size.name, "sets": sets}, {"data": data_id})
    status = _run_status(out)
    stamp = decide(stage, status.get("status") == "completed", force)
    if stamp:
        return reused(stage, stamp)
    if status:
        print(
            f"continuing the unfinished run in {display_path(out)} (--resume auto: from its newest checkpoint, "
            "if it has one)",
            flush=True,
        )
    stage.write_stamp("running")
    began = time.monotonic()
    tail = [
        "pretrain/main.py",
        "--config",
        "cpu",
        "--set",
        f"data.path={data}",
        f"output_dir={out}",
        *sets,
        "--resume",
        "auto",
    ]
    # DS_ACCELERATOR=cpu: the demo runs on CPU even where a GPU exists. One thread per rank and core.
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 2) // 2))
    env = {
        "DS_ACCELERATOR": "cpu",
        "OMP_NUM_THREADS": threads,
        "PYTHONUNBUFFERED": "1",
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions")),
    }
    run_command(
        [
            sys.executable,
            "-m",
            "deepspeed.launcher.runner",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            *tail,
        ],
        f"DS_ACCELERATOR=cpu OMP_NUM_THREADS={threads} " + show(["deepspeed", "--num_gpus", "2", *tail]),
        logs / f"{stage.name}.log",
        env,
    )
    final = _run_status(out).get("status")
    if final != "completed":
        raise DemoError(f"pretraining ended with status {final!r}, not completed; run the demo again to continue it")
    return stage.write_stamp("done", seconds=time.monotonic() - began, resumed=bool(status))


def _run_status(run_dir: Path) -> dict[str, Any]:
    from pretrain.run_status import RUN_STATUS_FILE

    try:
        return json.loads((run_dir / RUN_STATUS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def export(
    out: Path, run_dir: Path, pretrain_id: str, mixer: str, size: Size, force: bool, logs: Path
) -> dict[str, Any]:
    """The release folder (config.json, model.safetensors, tokenizer.json, model card), checked
    against the validation loss the engine logged."""
    stage = Stage(f"release-{mixer}", out, {"size": size.name}, {"pretrain": pretrain_id})
    stamp = decide(stage, (out / "model.safetensors").is_file() and (out / "config.json").is_file(), force)
    if stamp:
        return reused(stage, stamp)
    remove(out)  # an unfinished export: start clean
    stage.write_stamp("running")
    began = time.monotonic()
    tail = ["-m", "pretrain.export", str(run_dir), str(out), "--check"]
    run_command([sys.executable, *tail], show(["python", *tail]), logs / f"{stage.name}.log", {"DS_ACCELERATOR": "cpu"})
    return stage.write_stamp("done", seconds=time.monotonic() - began)


def finetune(
    out: Path, release: Path, release_id: str, mixer: str, size: Size, force: bool, logs: Path
) -> dict[str, Any]:
    """A fine-tuning sweep on the shipped SST-2 sample: the release, and the same model from scratch."""
    args = [
        "--release",
        f"{mixer}={release}",
        "--init",
        ",".join(size.inits),
        "--tasks",
        TASK,
        "--glue-dir",
        str(GLUE_DIR),
        *size.finetune_args,
        "--no-predict",
    ]
    settings = {"size": size.name, "task": TASK, "inits": list(size.inits), "args": list(size.finetune_args)}
    stage = Stage(f"finetune-{mixer}", out, settings, {"release": release_id})
    stamp = decide(stage, _sweep_done(out), force)
    if stamp:
        return reused(stage, stamp)
    stage.write_stamp("running")
    began = time.monotonic()
    tail = ["-m", "finetune", "sweep", "--sweep-dir", str(out), *args]
    run_command([sys.executable, *tail, *_progress_flag()], show(["python", *tail]), logs / f"{stage.name}.log")
    if not _sweep_done(out):
        raise DemoError(f"the fine-tuning sweep in {display_path(out)} did not finish every run")
    return stage.write_stamp("done", seconds=time.monotonic() - began)


def _sweep_done(sweep_dir: Path) -> bool:
    """Every planned run has its result file and the sweep is aggregated."""
    from finetune.errors import FinetuneError
    from finetune.sweep import load_plan
    from finetune.trainer import RESULT_FILE

    try:
        specs = load_plan(sweep_dir)
    except (FinetuneError, json.JSONDecodeError):
        return False  # not planned yet
    return (
        bool(specs)
        and all((spec.output_dir / RESULT_FILE).is_file() for spec in specs)
        and (sweep_dir / "results.json").is_file()
    )
