"""What a run checks before it trains: where it starts (a fresh run or a checkpoint), whether that checkpoint
may be resumed with this config, and whether this machine can do what the config asks. Every refusal is a
ConfigError, raised alike on every rank before any of them starts loading."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hypermixer import EncoderConfig
from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, PretrainConfig, Resolved, config_diff


def rank_seed(seed: int, rank: int, step: int | None = None) -> int:
    """A distinct torch seed per rank for dropout (model init uses `seed` itself, the same on every rank);
    with `step`: the fresh seed of a rank the checkpoint it resumes from had no RNG state for."""
    entropy = [seed, 0x5EED, rank] + ([] if step is None else [step])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def compile_problem(device_type: str) -> str | None:
    """Why torch.compile cannot work here (None: it can), checked before anything starts."""
    import shutil

    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return (
                f"torch.compile does not support this Python ({sys.version.split()[0]}) with torch {torch.__version__}"
            )
    except Exception as err:  # an unsupported build raises on import or in the check
        return f"torch.compile is unavailable in torch {torch.__version__} ({type(err).__name__}: {err})"
    if device_type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(name) for name in names):
            return f"torch.compile on CPU needs a C++ compiler ({', '.join(names)}: none found)"
    return None


def check_accelerator(config: PretrainConfig) -> None:
    """The precision and torch.compile the config asks for work on this machine's accelerator."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if config.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError([f"precision: fp16 is not supported on {accelerator.device_name()}; use bf16 or fp32"])
    if config.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError([f"precision: bf16 is not supported on {accelerator.device_name()}; use fp16 or fp32"])
    problem = compile_problem(accelerator.device_name()) if config.train.compile else None
    if problem:
        raise ConfigError([f"train.compile: {problem}; set train.compile=false to train without compiling"])


def check_resume(resolved: Resolved, state: dict[str, Any], path: Path) -> list[str]:
    """Refuse a resume whose model, data, batch, seed, precision or ZeRO stage changed; return what did
    change, one line each (world size, loader workers, any other setting)."""
    old, new = state["fingerprint"], resolved.fingerprint()
    old = {**old, "model": EncoderConfig.from_saved(old["model"]).to_dict()}  # keys added since it was written
    if "streams" not in old["data"]:
        raise ConfigError(
            [
                f"cannot resume from {path}: it was written with the per-world-size data order (before "
                f"data.streams), which this version cannot continue; start a new run in another output_dir"
            ]
        )
    changed = config_diff(old, new)
    if changed:
        details = [
            f"{key}: {json.dumps(_dig(old, key))} in the checkpoint, {json.dumps(_dig(new, key))} now"
            for key in changed
        ]
        raise ConfigError(
            [f"cannot resume from {path}: {d}" for d in details]
            + [
                "(model, data, batch, seed, precision and ZeRO stage must match; start a new run in "
                "another output_dir to change them)"
            ]
        )
    lines = []
    if int(state["world_size"]) != resolved.world_size:
        lines.append(
            f"world size: {state['world_size']} -> {resolved.world_size} (gradient accumulation "
            f"{resolved.grad_accum}; the same global sample order)"
        )
    for key in config_diff(state["config"], resolved.config.to_dict()):
        a, b = _dig(state["config"], key), _dig(resolved.config.to_dict(), key)
        lines.append(f"{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines


def _dig(values: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


class ResumeWorldSizeError(ConfigError):
    """A resume on a world size the run's data.streams cannot serve: one line, nothing touched."""

    def __str__(self) -> str:
        return self.problems[0]


def check_resume_world_size(config: PretrainConfig, world_size: int, resume: str | None) -> None:
    """Before anything is read or written: a resumed run (data.streams is fixed for the run) on a world size
    whose ranks x loader workers do not divide data.streams is refused in one line, its checkpoints untouched,
    so that a relaunch on a world size that fits continues it."""
    from pretrain.data import Layout

    if resume in (None, "", "none"):
        return
    found = ckpt.latest_checkpoint(config.checkpoint_dir) if resume == "auto" else Path(resume)
    d = config.data
    problem = Layout(0, world_size, d.num_workers, config.batch.micro_batch_size, d.streams).problem()
    if found is None or problem is None:
        return
    workers = max(1, d.num_workers)
    fits = [str(w) for w in range(1, d.streams // workers + 1) if d.streams % (w * workers) == 0]
    raise ResumeWorldSizeError(
        [
            f"cannot resume {found} on {world_size} ranks: {problem}, and data.streams is fixed for the run; "
            f"relaunch with --resume auto on {', '.join(fits)} ranks (with data.num_workers={d.num_workers}), or "
            "change data.num_workers; the checkpoints are untouched"
        ]
    )


def find_start(config: PretrainConfig, resume: str | None) -> Path | None:
    root = config.checkpoint_dir
    if resume == "auto":
        if int(os.environ.get("RANK", "0")) == 0:  # before anything else is written: a full disk may need the space
            for path in ckpt.remove_incomplete(root):
                print(f"removed {path}: an interrupted save (no {ckpt.STATE_FILE})", flush=True)
        return ckpt.latest_checkpoint(root)
    if resume in (None, "", "none"):
        existing = ckpt.latest_checkpoint(root)
        if existing is not None:
            raise ConfigError(
                [
                    f"{root} already holds checkpoints (newest: {existing.name}); pass --resume auto to "
                    "continue that run, or set output_dir / checkpoint.dir to start a new one"
                ]
            )
        return None
    try:
        return ckpt.resolve_checkpoint(resume)
    except FileNotFoundError as err:
        raise ConfigError([f"--resume: {err}"]) from None


@dataclass
class Start:
    """Where the run starts: `path` None for a fresh run; else the checkpoint, its trainer state, what
    changed since it was written, and whether its optimizer state must be re-partitioned for this world size.
    fallback (--resume auto): an unreadable checkpoint gives way to the previous complete one, in one line."""

    path: Path | None = None
    state: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    reshard: bool = False
    fallback: bool = False

    @classmethod
    def find(cls, resolved: Resolved, resume: str | None) -> Start:
        path = find_start(resolved.config, resume)
        return cls() if path is None else cls.at(resolved, path, fallback=resume == "auto")

    @classmethod
    def at(cls, resolved: Resolved, path: Path, fallback: bool) -> Start:
        try:
            state = ckpt.read_state(path)
        except (OSError, ValueError):
            if not fallback:
                raise
            # An unreadable trainer state: every rank reads it alike; verify() says so and falls back.
            return cls(path, {}, [], False, fallback)
        changed = check_resume(resolved, state, path)
        reshard = int(state["world_size"]) != resolved.world_size and ckpt.partitioned_optimizer(path)
        return cls(path, state, changed, reshard, fallback)

    def announce(self) -> None:
        if self.path is not None:
            print(f"resuming from {self.path} (step {self.state['step']})", flush=True)
            for line in self.changed:
                print(f"resume: changed {line}", flush=True)

    def verify(self, resolved: Resolved, rank: int) -> Start:
        """Collective: rank 0 reads every file of the checkpoint (DeepSpeed's pickles with the weights-only
        unpickler) and converts it for another world size; every rank refuses alike (exit 2), before any of
        them starts loading. Under --resume auto an unreadable checkpoint (a truncated file) gives way to the
        newest older one that reads, which rank 0 names in one line. Returns where the run starts."""
        if self.path is None:
            return self
        problem, unreadable, instead = None, None, None
        if rank == 0:
            try:
                unreadable = ckpt.check_files(self.path)
                if unreadable and self.fallback:
                    instead = next((p for p in ckpt.older_complete(self.path) if not ckpt.check_files(p)), None)
                    print(
                        f"resume: {self.path.name} is unreadable ({unreadable}); "
                        + (
                            f"falling back to {instead.name}, the previous complete checkpoint"
                            if instead
                            else "no earlier complete checkpoint reads either"
                        ),
                        flush=True,
                    )
            except ckpt.UnsafeCheckpointError as err:
                problem = str(err)
            if unreadable and instead is None:
                problem = f"{self.path}: {unreadable}"
        choice = [str(instead) if instead else None]
        dist.broadcast_object_list(choice)
        if choice[0] is not None:
            return Start.at(resolved, Path(choice[0]), fallback=False).verify(resolved, rank)
        if problem is None and self.reshard and rank == 0:
            print(
                f"resume: re-partitioning the optimizer state of {self.path.name} from {self.state['world_size']} "
                f"to {resolved.world_size} ranks (DeepSpeed universal checkpoint)",
                flush=True,
            )
            try:
                ckpt.to_universal(self.path)
            except ckpt.UnsafeCheckpointError as err:
                problem = str(err)
            except Exception as err:
                problem = (
                    f"{self.path}: could not convert it for {resolved.world_size} ranks ({type(err).__name__}: {err})"
                )
        flag = torch.tensor([0.0 if problem is None else 1.0])
        dist.all_reduce(flag)
        if flag.item():
            raise ConfigError([f"--resume: {problem or 'rank 0 refused the checkpoint ' + str(self.path)}"])
        return self
