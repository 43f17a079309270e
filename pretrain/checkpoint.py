"""Training checkpoints (complete or absent), resume, and the stop signals.

    <checkpoint dir>/
        latest                    the tag of the newest complete checkpoint; written last, atomically
        step_00001000/            DeepSpeed's files (engine.save_checkpoint: weights, optimizer partitions,
                                  LR scheduler), plus ours:
            rng_rank00000.safetensors   each rank's torch RNG state (dropout)
            trainer_state.json    step, tokens, data cursor, config, fingerprint, metrics; written by
                                  rank 0 after every rank has saved: its presence is the completion marker
        EXPORT.txt                how to get the weights: `python -m pretrain.export` (DeepSpeed's
                                  zero_to_fp32.py, which unpickles without restriction, is removed)

A resume on another world size re-partitions the optimizer state (ZeRO 1-3) through DeepSpeed's universal
checkpoint: rank 0 converts the step folder with `deepspeed.checkpoint.ds_to_universal` (reading it with the
weights-only unpickler) into `step_*/universal/` (built under a temporary name, then renamed), every rank
loads that with `checkpoint.load_universal`, and rank 0 deletes it once all have loaded. A rank with no RNG
file of its own (more ranks than wrote the checkpoint) gets a fresh seed.

A folder without trainer_state.json is an interrupted save: never resumed from, deleted at the next save
and by `--resume auto` before anything else is written (`remove_incomplete`). A save that fails on any
rank is reported by rank 0 in one line, "checkpoint step N failed: <reason>; step M is intact".
The checkpoint dir must be on a filesystem every rank sees (as DeepSpeed itself assumes).
Nothing of ours is pickled: JSON and safetensors only. DeepSpeed's files are pickles, which DeepSpeed
reads with torch's weights-only mode turned off; every load of ours goes through `weights_only_loads`,
which forces torch's weights-only unpickler on those calls too (see there).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import pickle
import re
import shutil
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from common.files import write_text_atomic

STATE_FILE = "trainer_state.json"
LATEST_FILE = "latest"
TAG_PATTERN = re.compile(r"^step_(\d{8,})$")
STATE_FORMAT_VERSION = 1


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    match = TAG_PATTERN.match(path.name)
    return int(match.group(1)) if match else None


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def checkpoint_folders(root: Path) -> list[Path]:
    """Every step_* folder, complete or not, oldest first."""
    if not root.is_dir():
        return []
    folders = [p for p in root.iterdir() if p.is_dir() and step_of(p) is not None]
    return sorted(folders, key=step_of)


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint: the `latest` pointer if it names a complete one, else a scan."""
    pointer = root / LATEST_FILE
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if step_of(candidate) is not None and is_complete(candidate):
            return candidate
    complete = [p for p in checkpoint_folders(root) if is_complete(p)]
    return complete[-1] if complete else None


def read_state(path: Path) -> dict[str, Any]:
    state = json.loads((path / STATE_FILE).read_text())
    if state.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"{path / STATE_FILE}: format_version {state.get('format_version')!r} is not {STATE_FORMAT_VERSION}"
        )
    return state


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A checkpoint folder, or a checkpoint dir (-> its latest complete checkpoint). For export and --resume PATH."""
    path = Path(spec)
    if step_of(path) is not None:
        if not is_complete(path):
            raise FileNotFoundError(f"{path}: not a complete checkpoint (no {STATE_FILE}; an interrupted save?)")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (expected step_* folders with {STATE_FILE})")
    return found


EXPORT_NOTE = "EXPORT.txt"
# DeepSpeed copies these next to every save: zero_to_fp32.py unpickles without restriction, and
# zero_to_torch.py (DeepSpeed >= 0.19) imports it.
UNSAFE_CONVERTERS = ("zero_to_fp32.py", "zero_to_torch.py")


class CheckpointSaveError(RuntimeError):
    """A save failed on some rank; the message is the one summary line."""


def _agree(failed: bool) -> bool:
    """Collective: True when any rank failed."""
    flag = torch.tensor([1.0 if failed else 0.0])
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def save(engine: Any, root: Path, step: int, state: dict[str, Any], keep_last: int) -> Path:
    """Collective: every rank calls it. Returns the checkpoint folder once it is complete on disk, or raises
    CheckpointSaveError on every rank with one line (printed by rank 0) when any rank's part failed.
    (A failure inside DeepSpeed's own collectives of save_checkpoint can leave the others waiting there:
    the stall watchdog ends that.)"""
    rank = dist.get_rank()
    path = root / tag_for(step)
    intact = latest_checkpoint(root) if rank == 0 else None
    error: BaseException | None = None
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if path.exists():  # an interrupted save of this very step, from an earlier attempt
                shutil.rmtree(path)
    except OSError as err:
        error = err
    if not _agree(error is not None):
        try:
            engine.save_checkpoint(str(root), tag=path.name, client_state={}, save_latest=False)
            save_rng_state(path, rank)
        except (OSError, RuntimeError) as err:
            error = err
    failed = _agree(error is not None)  # every rank's files are on disk before the marker says "complete"
    if not failed and rank == 0:
        try:
            files = file_sizes(path)  # every rank's files: what check_files expects to find before a resume
            write_text_atomic(
                path / STATE_FILE,
                json.dumps({"format_version": STATE_FORMAT_VERSION, **state, "files": files}, indent=1),
            )
            write_text_atomic(root / LATEST_FILE, path.name)
            replace_unsafe_converter(root)
            prune(root, keep_last)
        except OSError as err:
            error = err
    if _agree(error is not None):
        reason = (
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
            if error is not None
            else "failed on another rank"
        )
        try:  # torch reports a full disk as "unexpected pos ...": say how much room there is
            reason += f" ({root} has {shutil.disk_usage(root).free / 2**20:.2f} MiB free)"
        except OSError:
            pass
        line = f"checkpoint step {step} failed: {reason}; " + (
            f"step {step_of(intact)} is intact ({intact})" if intact else "no earlier checkpoint exists"
        )
        if rank == 0:
            print(f"pretrain: {line}", flush=True)
        raise CheckpointSaveError(line)
    return path


def replace_unsafe_converter(root: Path) -> None:
    """DeepSpeed's zero_to_fp32.py unpickles with torch.load(weights_only=False): a tampered checkpoint runs
    its payload through it. Replace it with a note pointing to the export that reads checkpoints safely."""
    for name in UNSAFE_CONVERTERS:
        (root / name).unlink(missing_ok=True)
    note = root / EXPORT_NOTE
    if not note.exists():
        write_text_atomic(
            note,
            "Release these checkpoints with `python -m pretrain.export <this folder> <out>`: it\n"
            "consolidates every ZeRO stage and reads the files with torch.load(weights_only=True).\n"
            "(DeepSpeed's zero_to_fp32.py and zero_to_torch.py were removed: they unpickle without restriction.)\n",
        )


def remove_incomplete(root: Path) -> list[Path]:
    """Delete interrupted saves (step folders without the completion marker): what `--resume auto` does
    first, so that it works in a folder where a save failed (e.g. a full disk) once space is freed."""
    doomed = [p for p in checkpoint_folders(root) if not is_complete(p)]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def file_sizes(path: Path) -> dict[str, int]:
    """The checkpoint's files (not its folders) and their sizes in bytes, recorded in its trainer state."""
    return {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file() and p.name != STATE_FILE}


def check_files(path: Path) -> str | None:
    """Whether a resume can read every file of checkpoint `path`: each file its trainer state records is there
    at its recorded size; the trainer state, each rank's RNG state and DeepSpeed's pickles read, the pickles
    with torch's weights-only unpickler and memory-mapped (the tensors are not read).
    The problem in one line (a missing, truncated or half-written file), or None; UnsafeCheckpointError for a
    pickled object that is not plain data. Rank 0 runs it before any rank loads, so a refused checkpoint is
    refused on every rank alike, never half-way through a collective load."""

    def unreadable(name: str, err: Exception) -> str:
        return f"{name}: unreadable ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"

    try:
        recorded = read_state(path).get("files", {})  # checkpoints saved before sizes were recorded have none
    except Exception as err:
        return unreadable(STATE_FILE, err)
    missing = [name for name in recorded if not (path / name).is_file()]
    if missing:
        return f"{missing[0]}: missing"
    for file in [*sorted(path.glob("*.pt")), *sorted(path.glob("rng_rank*.safetensors"))]:
        try:
            if file.suffix == ".pt":
                with weights_only_loads(file):
                    torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            else:
                load_file(str(file))
        except UnsafeCheckpointError:
            raise
        except Exception as err:
            return unreadable(file.name, err)
    # Sizes last: a file that reads but was replaced is refused as unsafe above, not passed over as resized.
    for name, size in recorded.items():
        if (now := (path / name).stat().st_size) != size:
            return f"{name}: {now:,} bytes, where the checkpoint recorded {size:,}"
    return None


def older_complete(path: Path) -> list[Path]:
    """The complete checkpoints older than `path` in its folder, newest first."""
    step = step_of(path)
    return [p for p in reversed(checkpoint_folders(path.parent)) if is_complete(p) and (step_of(p) or 0) < (step or 0)]


def prune(root: Path, keep_last: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep_last`, and interrupted saves (no marker)."""
    folders = checkpoint_folders(root)
    complete = [p for p in folders if is_complete(p)]
    doomed = [p for p in folders if not is_complete(p)] + complete[:-keep_last]
    for path in doomed:
        # The marker first: a kill half-way through leaves an interrupted save, never a "complete" checkpoint
        # with files missing.
        (path / STATE_FILE).unlink(missing_ok=True)
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# Besides tensors and containers, ZeRO checkpoints (stages 0-3, fp32/bf16/fp16) pickle only these plain
# DeepSpeed records; found by loading checkpoints of every stage and precision.
DEEPSPEED_PICKLED_TYPES = (
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # torch reads it on every torch.load call


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object that is not plain data."""


@contextmanager
def weights_only_loads(path: Path) -> Iterator[None]:
    """Within: every torch.load, DeepSpeed's included (engine.load_checkpoint and zero_to_fp32 pass
    weights_only=False), uses torch's weights-only unpickler, so a tampered checkpoint cannot run code.
    The environment variable is the one switch torch offers that overrides an explicit weights_only=False."""
    allowed = [getattr(importlib.import_module(module), name) for module, name in DEEPSPEED_PICKLED_TYPES]
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(allowed):
            yield
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = found.group(1) if found else "a pickled object"
        raise UnsafeCheckpointError(
            f"{path}: holds {what}, which is not plain data; refusing to unpickle it "
            "(checkpoints are read with torch.load(weights_only=True))"
        ) from None
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


UNIVERSAL_DIR = "universal"


def partitioned_optimizer(path: Path) -> bool:
    """Whether the checkpoint's optimizer state is split by rank (ZeRO 1-3): what a change of world size must
    re-partition. ZeRO-0 keeps one whole copy in mp_rank_00_model_states.pt, readable on any world size."""
    return any(path.glob("*optim_states.pt"))


def to_universal(path: Path) -> Path:
    """Rank 0: convert checkpoint `path` into DeepSpeed's universal format (per-parameter fp32 weights and
    optimizer moments, no partitioning) in `path/universal`; DeepSpeed's own converter, run in this process
    (no worker processes) with every file read through the weights-only unpickler. Its chatter is dropped."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out, scratch = path / UNIVERSAL_DIR, path / f".{UNIVERSAL_DIR}.tmp"
    for stale in (out, scratch):  # a conversion interrupted before, or left by a crash after loading
        shutil.rmtree(stale, ignore_errors=True)
    scratch.mkdir()
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(scratch / UNIVERSAL_DIR),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    chatter = io.StringIO()
    with weights_only_loads(path), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
        ds_to_universal(args)
    os.replace(scratch / UNIVERSAL_DIR, out)  # complete, or absent
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def per_group_settings(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each param group's hyperparameters that differ between groups (e.g. weight_decay)."""
    keys = {key for group in groups for key in group if key != "params"}
    differing = [key for key in keys if len({repr(group.get(key)) for group in groups}) > 1]
    return [{key: group[key] for key in differing if key in group} for group in groups]


def load(engine: Any, path: Path, universal: bool = False) -> tuple[dict[str, Any], bool]:
    """Collective: restore the engine (weights, optimizer, scheduler) and this rank's RNG; return our state
    and whether this rank's RNG was in the checkpoint. universal: read `path/universal` (made by rank 0 with
    `to_universal`; the engine was built with checkpoint.load_universal) and delete it once every rank has."""
    state = read_state(path)
    source = path / UNIVERSAL_DIR if universal else path
    optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)  # the torch optimizer inside ZeRO
    own = per_group_settings(optimizer.param_groups)
    with weights_only_loads(source):
        loaded, _ = engine.load_checkpoint(
            str(source.parent), tag=source.name, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    if loaded is None:
        raise RuntimeError(f"{source}: DeepSpeed could not load this checkpoint")
    if universal:
        # Two slips of DeepSpeed's ZeRO-3 universal load, undone: every param group gets the first group's
        # hyperparameters (weight decay on biases and LayerNorms, here): put back what differs between
        # groups; and every group's Adam `step` is one shared tensor, which torch's AdamW increments in place
        # once per group, so bias correction would run ahead: give each its own.
        for group, settings in zip(optimizer.param_groups, own):
            group.update(settings)
        for param_state in optimizer.state.values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].clone()
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(source, ignore_errors=True)
    return state, load_rng_state(path, dist.get_rank())


def save_rng_state(path: Path, rank: int) -> None:
    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    save_file(tensors, str(path / f"rng_rank{rank:05d}.safetensors"))


def load_rng_state(path: Path, rank: int) -> bool:
    """Restore this rank's RNG; False when the checkpoint has none for it (written by fewer ranks)."""
    file = path / f"rng_rank{rank:05d}.safetensors"
    if not file.is_file():
        return False
    tensors = load_file(str(file))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


class StopSignals:
    """SIGTERM and SIGUSR1 only set a flag; the training loop agrees on it across ranks at the next
    step boundary, checkpoints, and returns. Previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.getsignal(signum)
                signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    @property
    def name(self) -> str | None:
        return signal.Signals(self.received).name if self.received is not None else None


class Checkpointer:
    """The run's checkpoint policy on one engine: when to save (`checkpoint.every_steps`, the last step, a
    stop signal), where, how many to keep; and the restore of a resumed run (engine, optimizer, RNG)."""

    def __init__(self, engine: Any, root: Path, every_steps: int, keep_last: int, total_steps: int) -> None:
        self.engine, self.root = engine, root
        self.every_steps, self.keep_last, self.total_steps = every_steps, keep_last, total_steps

    def due(self, step: int, stop: bool) -> bool:
        return bool(self.every_steps and step % self.every_steps == 0) or step == self.total_steps or stop

    def save(self, step: int, state: dict[str, Any]) -> Path:
        """Collective: the engine, every rank's RNG and `state` (the trainer's state_dict) as one checkpoint."""
        return save(self.engine, self.root, step, state, self.keep_last)

    def restore(self, path: Path, universal: bool) -> bool:
        """Collective: load the engine and this rank's RNG from `path`; whether this rank's RNG was there."""
        try:
            _, own_rng = load(self.engine, path, universal=universal)
        except UnsafeCheckpointError as err:
            from pretrain.config import ConfigError

            raise ConfigError([f"--resume: {err}"]) from None
        return own_rng
