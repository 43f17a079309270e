"""The training loop on a DeepSpeed engine (ZeRO 0-3, fp32/bf16/fp16); the step itself is pretrain.step.

The step reads the device once per optimizer step (non-finite flags and the stop signal, all-reduced
together); the loop reads it again only at log lines, evaluations and checkpoints. A step with a
non-finite loss on any rank is dropped whole and redone; `train.max_nonfinite_in_a_row` non-finite
micro-batches in a row abort the run. A stop signal on any rank makes every rank finish the step,
checkpoint together and return.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from common.files import write_json_atomic
from common.optim import lr_scheduler, param_groups
from data_pipeline.errors import DataPipelineError
from hypermixer import EncoderConfig, ForMaskedLM, flops_per_token, max_predictions_per_seq
from pretrain import checkpoint as ckpt
from pretrain.config import ConfigError, PretrainConfig, Resolved, config_diff, resolve
from pretrain.data import Cursor, Layout, Masking, TrainBatches, validation_batches, validation_samples
from pretrain.faults import inject_fault
from pretrain.metrics import MetricsLog, default_peak_tflops, throughput
from pretrain.step import NonFiniteGuard, NonFiniteLossError, StepResult, train_step
from pretrain.watchdog import Watchdog, set_default_group_timeout

__all__ = ["NonFiniteLossError", "run", "train_step"]

RUN_STATUS_FILE = "run_status.json"


@dataclass
class RunOutcome:
    status: str  # "completed" | "stopped" (by SIGTERM/SIGUSR1, after a complete checkpoint)
    step: int
    total_steps: int
    run_dir: str
    checkpoint: str | None = None
    signal: str | None = None

    @property
    def stopped(self) -> bool:
        return self.status == "stopped"


# ---------------------------------------------------------------------------------------- pieces


def make_scheduler(config: PretrainConfig, total_steps: int) -> Callable[[Any], LambdaLR]:
    o = config.optim
    return lambda optimizer: lr_scheduler(optimizer, o.warmup_steps, total_steps, o.decay, o.min_lr_ratio)


def rank_seed(seed: int, rank: int) -> int:
    """A distinct torch seed per rank for dropout (model init uses `seed` itself, the same on every rank)."""
    return int(np.random.SeedSequence([seed, 0x5EED, rank]).generate_state(1)[0])


def masked_lm_sums(
    forward: Callable[..., Any], batches: Iterable[dict[str, torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """[sum of per-token loss, correct predictions, masked tokens] over batches (float64)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = forward(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
            n = torch.as_tensor(out.num_masked, dtype=torch.float64, device=device)
            sums += torch.stack([out.loss.double() * n, out.accuracy.double() * n, n])
    return sums


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


def write_run_status(run_dir: Path, **values: Any) -> None:
    """run_status.json: what a launcher reads after the process ends ("running" after a crash)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / RUN_STATUS_FILE, {**values, "updated_at": time.time()})


def record_failure(
    record: Callable[[str, str], None], err: BaseException, signal_name: str | None, run_dir: Path
) -> None:
    """run_status.json "killed" (a signal came first) or "failed", with the reason, if the disk still takes it.
    A corrupt-shard record written by the rank that found it is not overwritten by rank 0's consequence."""
    lines = str(err).strip().splitlines()
    text = lines[-1] if len(lines) > 1 and "DataLoader worker" in lines[0] else (lines[0] if lines else "")
    reason = f"{type(err).__name__}: {text.removeprefix('data_pipeline.errors.DataPipelineError: ')}"[:500]
    try:
        if not isinstance(err, DataPipelineError):
            time.sleep(1.0)  # let a rank that found a corrupt shard write first
            previous = json.loads((run_dir / RUN_STATUS_FILE).read_text())
            if previous.get("status") == "failed" and "DataPipelineError" in str(previous.get("reason")):
                return
    except (OSError, ValueError):
        pass
    try:
        record("killed" if signal_name else "failed", f"{signal_name}; then {reason}" if signal_name else reason)
    except OSError:
        pass


SAMPLE_IDS_FILE = "sample_ids.jsonl"


def write_sample_ids(run_dir: Path, step: int, batches: TrainBatches, rank: int, world_size: int) -> None:
    """metrics.sample_ids, collective: rank 0 appends one line, the step's micro-batches of every rank in the
    global order (micro-step j of rank r is global micro-batch j x world size + r), as [shard, index] rows;
    dropped (non-finite) micro-batches included."""
    mine = [ids.tolist() for ids in batches.taken_ids]
    batches.taken_ids.clear()
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        rows = [row for j in range(len(mine)) for r in range(world_size) for row in gathered[r][j]]
        with open(run_dir / SAMPLE_IDS_FILE, "a") as log:
            log.write(json.dumps({"step": step, "world_size": world_size, "samples": rows}) + "\n")


def read_sample_ids(run_dir: Path) -> dict[int, list[tuple[int, int]]]:
    """Each step's training sequences from the metrics.sample_ids log; a resumed run repeats the steps
    after its checkpoint, and the last line of a step wins."""
    steps: dict[int, list[tuple[int, int]]] = {}
    for line in (run_dir / SAMPLE_IDS_FILE).read_text().splitlines():
        record = json.loads(line)
        steps[record["step"]] = [(shard, index) for shard, index in record["samples"]]
    return dict(sorted(steps.items()))


def memory_gib(device: torch.device) -> float:
    """Peak allocated accelerator memory since the last call (CUDA), else this process's resident memory."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        return peak / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


# ---------------------------------------------------------------------------------------- the run


@dataclass
class Window:
    """Training-step work since the last log line (eval and checkpoint time excluded)."""

    steps: int = 0
    seconds: float = 0.0
    dropped: int = 0
    sums: torch.Tensor | None = None
    grad_norm: float | None = None
    lr: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def add(self, result: StepResult, seconds: float, lr: float) -> None:
        self.steps += 1
        self.seconds += seconds
        self.dropped += result.dropped
        self.sums = result.sums if self.sums is None else self.sums + result.sums
        self.grad_norm = result.grad_norm
        self.lr = lr


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
        details = []
        for key in changed:
            a, b = _dig(old, key), _dig(new, key)
            details.append(f"{key}: {json.dumps(a)} in the checkpoint, {json.dumps(b)} now")
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


def run(
    config: PretrainConfig, resume: str | None = None, build_model: Callable[[EncoderConfig], nn.Module] = ForMaskedLM
) -> RunOutcome:
    """Train on every rank of an initialised or initialisable (env://) process group.

    build_model: the masked-LM module for the resolved encoder config. Its forward(input_ids,
    attention_mask=, labels=) returns an object with `loss`, `accuracy` and `num_masked`, as
    ForMaskedLM's does; bench.quality passes Hugging Face's BERT here as an independent reference."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    resolved = resolve(config, world_size)  # every config/data mistake surfaces here, before any collective
    start = find_start(config, resume)
    state: dict[str, Any] = {}
    reshard = False  # the optimizer state is partitioned by rank and the world size changed
    if start is not None:
        state = ckpt.read_state(start)
        changed = check_resume(resolved, state, start)
        reshard = int(state["world_size"]) != world_size and ckpt.partitioned_optimizer(start)
    accelerator = get_accelerator()
    if config.precision == "fp16" and not accelerator.is_fp16_supported():
        raise ConfigError([f"precision: fp16 is not supported on {accelerator.device_name()}; use bf16 or fp32"])
    if config.precision == "bf16" and not accelerator.is_bf16_supported():
        raise ConfigError([f"precision: bf16 is not supported on {accelerator.device_name()}; use fp16 or fp32"])
    problem = compile_problem(accelerator.device_name()) if config.train.compile else None
    if problem:
        raise ConfigError([f"train.compile: {problem}; set train.compile=false to train without compiling"])

    deepspeed.init_distributed(timeout=set_default_group_timeout(config.train.stall_timeout_s))
    rank = dist.get_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    device = torch.device(accelerator.device_name(local_rank))
    run_dir = config.run_dir
    if rank == 0:
        write_run_status(
            run_dir,
            status="running",
            step=int(state.get("step", 0)),
            total_steps=resolved.total_steps,
            checkpoint=str(start) if start else None,
            signal=None,
        )
        if start is not None:
            print(f"resuming from {start} (step {state['step']})", flush=True)
            for line in changed:
                print(f"resume: changed {line}", flush=True)

    if start is not None:  # every rank refuses alike (exit 2), before any of them starts loading
        problem = ckpt.check_pickles(start) if rank == 0 else None
        if problem is None and reshard and rank == 0:
            print(
                f"resume: re-partitioning the optimizer state of {start.name} from {state['world_size']} to "
                f"{world_size} ranks (DeepSpeed universal checkpoint)",
                flush=True,
            )
            try:
                ckpt.to_universal(start)
            except ckpt.UnsafeCheckpointError as err:
                problem = str(err)
            except Exception as err:
                problem = f"{start}: could not convert it for {world_size} ranks ({type(err).__name__}: {err})"
        flag = torch.tensor([0.0 if problem is None else 1.0])
        dist.all_reduce(flag)
        if flag.item():
            raise ConfigError([f"--resume: {problem or 'rank 0 refused the checkpoint ' + str(start)}"])

    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(resolved.model)
    if hasattr(model, "encoder"):
        model.encoder.gradient_checkpointing = config.train.activation_checkpointing
    slots = None
    if hasattr(model, "max_predictions"):  # static MLM slots: no data-dependent shapes in the step
        slots = model.max_predictions = max_predictions_per_seq(resolved.seq_len, config.data.mask_prob)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    ds_config = resolved.deepspeed
    if reshard:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, config.optim.weight_decay),
        config=ds_config,
        lr_scheduler=make_scheduler(config, resolved.total_steps),
    )
    if config.train.compile:
        engine.compile()
    torch.manual_seed(rank_seed(config.seed, rank))
    if start is not None:
        try:
            state, own_rng = ckpt.load(engine, start, universal=reshard)
        except ckpt.UnsafeCheckpointError as err:
            raise ConfigError([f"--resume: {err}"]) from None
        if not own_rng:  # a rank the checkpoint did not have: fresh dropout masks, seeded by rank and step
            torch.manual_seed(
                int(np.random.SeedSequence([config.seed, 0x5EED, rank, int(state["step"])]).generate_state(1)[0])
            )

    step = int(state.get("step", 0))
    tokens = int(state.get("tokens", 0))
    train_seconds = float(state.get("train_seconds", 0.0))  # training steps only: no eval, no checkpoints
    guard = NonFiniteGuard(config.train.max_nonfinite_in_a_row, total=int(state.get("nonfinite_dropped", 0)))
    layout = Layout(rank, world_size, config.data.num_workers, config.batch.micro_batch_size, config.data.streams)
    masking = Masking.from_manifest(resolved.manifest, config.data)
    batches = TrainBatches(
        resolved.manifest,
        layout,
        masking,
        config.seed,
        config.data.shuffle,
        config.data.shuffle_shards,
        Cursor(**state.get("cursor", {})),
        pin_memory=device.type == "cuda",
        record_ids=config.metrics.sample_ids,
    )
    eval_micro_batch = config.eval.micro_batch_size or config.batch.micro_batch_size
    eval_per_rank = validation_samples(
        resolved.validation_manifest, config.data.validation_split, world_size, config.eval.max_samples
    )
    flops = flops_per_token(resolved.model, resolved.seq_len, mlm_fraction=config.data.mask_prob)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    peak = config.metrics.peak_tflops or default_peak_tflops(device_name, config.precision)
    norm_by_hand = resolved.zero_stage == 0 and config.precision == "fp32"
    wandb_run_id = state.get("wandb_run_id") or secrets.token_hex(4)
    last: dict[str, Any] = {"train": state.get("last_train"), "eval": state.get("last_eval")}
    log = None
    if rank == 0:
        log = MetricsLog(
            run_dir,
            config.run_name,
            config.logging.wandb,
            {
                **config.to_dict(),
                "resolved_model": resolved.model.to_dict(),
                "world_size": world_size,
                "grad_accum": resolved.grad_accum,
                "total_steps": resolved.total_steps,
                "manifest_sha256": resolved.manifest_sha256,
            },
            wandb_run_id,
            step if start is not None else None,
            resolved.total_steps,
        )
        if eval_per_rank == 0:
            warnings.warn(
                f"the validation split {config.data.validation_split!r} has fewer sequences than ranks: no evaluation",
                stacklevel=1,
            )
        print(
            f"run {config.run_name}: {resolved.model.mixer}, {num_parameters:,} parameters, {world_size} rank(s) "
            f"on {device.type}, ZeRO-{resolved.zero_stage}, {config.precision}, "
            f"global batch {config.batch.global_batch_size} = {config.batch.micro_batch_size} x {world_size} ranks "
            f"x {resolved.grad_accum} accumulation, {resolved.total_steps} steps, "
            f"{batches.batches_per_epoch * world_size * config.batch.micro_batch_size:,} sequences per epoch",
            flush=True,
        )

    def evaluate() -> dict[str, Any]:
        began = time.perf_counter()
        engine.eval()
        sums = masked_lm_sums(
            engine,
            validation_batches(
                resolved.validation_manifest,
                config.data.validation_split,
                masking,
                config.seed,
                rank,
                world_size,
                eval_micro_batch,
                config.eval.max_samples,
            ),
            device,
        )
        engine.train()
        dist.all_reduce(sums)
        loss_sum, correct, masked = sums.tolist()
        return {
            "kind": "eval",
            "step": step,
            "loss": loss_sum / max(masked, 1),
            "accuracy": correct / max(masked, 1),
            "masked_tokens": int(masked),
            "seconds": time.perf_counter() - began,
            "tokens": tokens,
            "train_seconds": train_seconds,
        }

    def checkpoint_state() -> dict[str, Any]:
        return {
            "run_name": config.run_name,
            "step": step,
            "tokens": tokens,
            "train_seconds": train_seconds,
            "cursor": batches.cursor.to_dict(),
            "world_size": world_size,
            "total_steps": resolved.total_steps,
            "fingerprint": resolved.fingerprint(),
            "config": config.to_dict(),
            "model": resolved.model.to_dict(),
            "zero_stage": resolved.zero_stage,
            "data": {
                "path": str(Path(resolved.manifest["_root"])),
                "manifest_sha256": resolved.manifest_sha256,
                "tokenizer": resolved.manifest["tokenizer"],
                "validation_path": str(Path(resolved.validation_manifest["_root"])),
                "validation_split": config.data.validation_split,
            },
            "nonfinite_dropped": guard.total,
            "wandb_run_id": wandb_run_id,
            "last_train": last["train"],
            "last_eval": last["eval"],
        }

    outcome = RunOutcome(
        "completed", step, resolved.total_steps, str(run_dir), checkpoint=str(start) if start else None
    )
    window = Window()

    def record(status: str, reason: str) -> None:  # run_status.json for a run that did not end normally
        write_run_status(
            run_dir,
            status=status,
            step=step,
            total_steps=resolved.total_steps,
            checkpoint=outcome.checkpoint,
            signal=None,
            reason=reason,
        )

    stall = Watchdog.for_default_group(
        rank, world_size, config.train.stall_timeout_s, on_stall=lambda line: record("stalled", line)
    ).start(step)
    with ckpt.StopSignals() as signals:
        try:
            while step < resolved.total_steps:
                stall.progress(step)
                log_now = (step + 1) % config.logging.every_steps == 0 or step + 1 == resolved.total_steps
                lr = engine.get_lr()[0]
                began = time.perf_counter()
                result = train_step(
                    engine,
                    batches,
                    device,
                    guard,
                    lambda: signals.received is not None,
                    resolved.grad_accum,
                    norm_by_hand,
                    rank,
                    world_size,
                    slots,
                    want_norm=log_now,
                )
                step += 1
                stall.progress(step)
                if config.metrics.sample_ids:
                    write_sample_ids(run_dir, step, batches, rank, world_size)
                tokens += resolved.tokens_per_step
                seconds = time.perf_counter() - began
                train_seconds += seconds
                window.add(result, seconds, lr)
                inject_fault(rank, step)  # a no-op unless a test set PRETRAIN_FAULT
                if log_now:
                    sums = window.sums.clone()
                    dist.all_reduce(sums)
                    loss_sum, correct, masked = sums.tolist()
                    speed = throughput(
                        window.steps * resolved.tokens_per_step,
                        window.steps * config.batch.global_batch_size,
                        window.seconds,
                        world_size,
                        flops,
                        peak,
                    )
                    last["train"] = {
                        "kind": "train",
                        "step": step,
                        "loss": loss_sum / max(masked, 1),
                        "accuracy": correct / max(masked, 1),
                        "lr": window.lr,
                        "grad_norm": None if window.grad_norm is None else float(window.grad_norm),
                        **speed,
                        "memory_gib": memory_gib(device),
                        "tokens": tokens,
                        "epoch": batches.cursor.epoch,
                        "nonfinite_skipped": guard.total,
                        "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
                        "eta_s": (resolved.total_steps - step) * window.seconds / window.steps,
                    }
                    if log is not None:
                        log.log(last["train"])
                    window = Window()
                every = config.eval.every_steps
                if eval_per_rank and ((every and step % every == 0) or step == resolved.total_steps):
                    last["eval"] = evaluate()
                    if log is not None:
                        log.log(last["eval"])
                every = config.checkpoint.every_steps
                if (every and step % every == 0) or step == resolved.total_steps or result.stop:
                    outcome.checkpoint = str(
                        ckpt.save(engine, config.checkpoint_dir, step, checkpoint_state(), config.checkpoint.keep_last)
                    )
                if result.stop and step < resolved.total_steps:
                    outcome.status, outcome.signal = "stopped", signals.name or "a signal on another rank"
                    break
        except NonFiniteLossError:
            if rank == 0:
                write_run_status(
                    run_dir,
                    status="diverged",
                    step=step,
                    total_steps=resolved.total_steps,
                    checkpoint=outcome.checkpoint,
                    signal=None,
                )
            raise
        except BaseException as err:
            stall.check_error(err)  # a collective that timed out: the stall exit (does not return)
            if rank == 0 or isinstance(err, DataPipelineError):  # a corrupt shard: the rank that read it says so
                record_failure(record, err, signals.name, run_dir)
            raise
        finally:
            stall.stop()
            batches.close()
            if log is not None:
                log.summary({f"final/{k}": v for k, v in (last["eval"] or {}).items() if k not in ("kind",)})
                log.close()
    outcome.step = step
    if rank == 0:
        write_run_status(
            run_dir,
            status=outcome.status,
            step=step,
            total_steps=resolved.total_steps,
            checkpoint=outcome.checkpoint,
            signal=outcome.signal,
        )
        if outcome.stopped:
            print(
                f"stopped by {outcome.signal} at step {step}; checkpoint at {outcome.checkpoint}; "
                "resume with --resume auto",
                flush=True,
            )
        else:
            print(f"completed {step} steps; checkpoint at {outcome.checkpoint}", flush=True)
    dist.barrier()
    return outcome
