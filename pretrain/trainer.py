"""The training loop on a DeepSpeed engine (ZeRO 0-3, fp32/bf16/fp16); the step itself is pretrain.step.

`Trainer(config, resume)` builds everything once (checks, process group, engine, data, components);
`train()` is the loop. Its components: `Evaluator` (pretrain.evaluation), `Checkpointer`
(pretrain.checkpoint), `TrainingMetrics` and `MetricsLog` (pretrain.metrics), `RunStatus`
(pretrain.run_status), the stall `Watchdog` (pretrain.watchdog). What a checkpoint keeps of the loop
(counters and the loader's cursor) is `Trainer.state_dict()`; the engine and each rank's RNG are saved beside it.

The step reads the device once per optimizer step (non-finite flags and the stop signal, all-reduced
together); the loop reads it again only at log lines, evaluations and checkpoints. A step with a
non-finite loss on any rank is dropped whole and redone; `train.max_nonfinite_in_a_row` non-finite
micro-batches in a row abort the run. A stop signal on any rank makes every rank finish the step,
checkpoint together and return.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from common.optim import lr_scheduler, param_groups
from data_pipeline.errors import DataPipelineError
from hypermixer import EncoderConfig, ForMaskedLM, flops_per_token, max_predictions_per_seq
from pretrain import checkpoint as ckpt
from pretrain.config import PretrainConfig, Resolved, resolve
from pretrain.data import Cursor, Layout, Masking, TrainBatches
from pretrain.distributed import init_distributed
from pretrain.evaluation import Evaluator
from pretrain.metrics import MetricsLog, TrainingMetrics, default_peak_tflops
from pretrain.run_status import NoProgressError, RunStatus, read_run_status
from pretrain.sample_ids import write_sample_ids
from pretrain.startup import Start, check_accelerator, check_resume_world_size, rank_seed
from pretrain.step import NonFiniteGuard, NonFiniteLossError, StepResult, train_step
from pretrain.watchdog import Watchdog, set_default_group_timeout

__all__ = ["AfterStep", "NonFiniteLossError", "RunOutcome", "Trainer", "run"]

# Called on every rank with (rank, step) after each finished step; the integration tests install their
# fault injection here (tests/integration/fault_main.py). Empty in real runs.
AfterStep = Callable[[int, int], None]


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


@dataclass
class Counters:
    """The loop's own state, kept in every checkpoint (the engine's and the loader's are kept beside it)."""

    step: int = 0
    tokens: int = 0
    train_seconds: float = 0.0  # training steps only: no eval, no checkpoints
    wandb_run_id: str = ""
    last_train: dict[str, Any] | None = None
    last_eval: dict[str, Any] | None = None

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Counters:
        return cls(
            int(state.get("step", 0)),
            int(state.get("tokens", 0)),
            float(state.get("train_seconds", 0.0)),
            state.get("wandb_run_id") or secrets.token_hex(4),
            state.get("last_train"),
            state.get("last_eval"),
        )


def build_engine(
    resolved: Resolved, build_model: Callable[[EncoderConfig], nn.Module], rank: int, start: Start
) -> tuple[Any, int | None, int]:
    """(the DeepSpeed engine, the model's static MLM slots or None, its parameter count), seeded for dropout."""
    import deepspeed

    config = resolved.config
    torch.manual_seed(config.seed)  # identical initial weights on every rank
    model = build_model(resolved.model)
    if hasattr(model, "encoder"):
        model.encoder.gradient_checkpointing = config.train.activation_checkpointing
    slots = None
    if hasattr(model, "max_predictions"):  # static MLM slots: no data-dependent shapes in the step
        slots = model.max_predictions = max_predictions_per_seq(resolved.seq_len, config.data.mask_prob)
    num_parameters = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
    ds_config = resolved.deepspeed
    if start.reshard:
        ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
    o = config.optim
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, o.weight_decay),
        config=ds_config,
        lr_scheduler=lambda opt: lr_scheduler(opt, o.warmup_steps, resolved.total_steps, o.decay, o.min_lr_ratio),
    )
    if config.train.compile:
        engine.compile()
    torch.manual_seed(rank_seed(config.seed, rank))
    return engine, slots, num_parameters


def local_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    accelerator, local_rank = get_accelerator(), int(os.environ.get("LOCAL_RANK", "0"))
    if accelerator.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


class Trainer:
    """Train on every rank of an initialised or initialisable (env://) process group.

    build_model: the masked-LM module for the resolved encoder config. Its forward(input_ids,
    attention_mask=, labels=) returns an object with `loss`, `accuracy` and `num_masked`, as
    ForMaskedLM's does; bench.quality passes Hugging Face's BERT here as an independent reference.
    after_step: called with (rank, step) after every step (see AfterStep)."""

    def __init__(
        self,
        config: PretrainConfig,
        resume: str | None = None,
        build_model: Callable[[EncoderConfig], nn.Module] = ForMaskedLM,
        after_step: Sequence[AfterStep] = (),
    ) -> None:
        self.config, self.after_step = config, list(after_step)
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_resume_world_size(config, world_size, resume)
        resolved = self.resolved = resolve(config, world_size)  # before any collective
        start = Start.find(resolved, resume)
        check_accelerator(config)
        init_distributed(set_default_group_timeout(config.train.stall_timeout_s))
        self.rank, self.world_size, self.device = dist.get_rank(), resolved.world_size, local_device()
        start = start.verify(resolved, self.rank)  # may fall back to an older checkpoint (an unreadable newest)
        self.counters = Counters.from_state(start.state)
        previous = [read_run_status(config.run_dir) if self.rank == 0 else None]
        dist.broadcast_object_list(previous)  # every rank counts restarts from the file as it was
        self.status = RunStatus(
            config.run_dir,
            resolved.total_steps,
            self.counters.step,
            start.path,
            previous[0] or {},
            resumed=resume not in (None, "", "none"),
        )
        try:
            self.status.check_progress(config.train.max_requeues_without_progress)  # alike on every rank
        except NoProgressError as err:
            if self.rank == 0:
                self.status.write("failed", reason=str(err))
            raise
        if self.rank == 0:
            self.status.write("running")
            start.announce()
        self.engine, slots, num_parameters = build_engine(resolved, build_model, self.rank, start)
        self.checkpointer = ckpt.Checkpointer(
            self.engine,
            config.checkpoint_dir,
            config.checkpoint.every_steps,
            config.checkpoint.keep_last,
            resolved.total_steps,
        )
        if start.path is not None and not self.checkpointer.restore(start.path, start.reshard):
            # a rank the checkpoint did not have: fresh dropout masks, seeded by rank and step
            torch.manual_seed(rank_seed(config.seed, self.rank, self.counters.step))
        self.guard = NonFiniteGuard(
            config.train.max_nonfinite_in_a_row, total=int(start.state.get("nonfinite_dropped", 0))
        )
        masking = Masking.from_manifest(resolved.manifest, config.data)
        self.batches = TrainBatches(
            resolved.manifest,
            Layout(
                self.rank, self.world_size, config.data.num_workers, config.batch.micro_batch_size, config.data.streams
            ),
            masking,
            config.seed,
            config.data.shuffle,
            config.data.shuffle_shards,
            Cursor(**start.state.get("cursor", {})),
            pin_memory=self.device.type == "cuda",
            record_ids=config.metrics.sample_ids,
        )
        self.step_args = (
            resolved.grad_accum,
            resolved.zero_stage == 0 and config.precision == "fp32",
            self.rank,
            self.world_size,
            slots,
        )
        self.evaluator = Evaluator(resolved, masking, self.rank, self.device)
        self.metrics = self.training_metrics()
        self.log = self.metrics_log(start) if self.rank == 0 else None
        self.outcome = RunOutcome(
            "completed", self.counters.step, resolved.total_steps, str(config.run_dir), self.status.checkpoint
        )
        if self.rank == 0:
            self.announce(num_parameters)

    def training_metrics(self) -> TrainingMetrics:
        config, resolved = self.config, self.resolved
        device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return TrainingMetrics(
            config.logging.every_steps,
            resolved.total_steps,
            resolved.tokens_per_step,
            config.batch.global_batch_size,
            self.world_size,
            flops_per_token(resolved.model, resolved.seq_len, mlm_fraction=config.data.mask_prob),
            config.metrics.peak_tflops or default_peak_tflops(device_name, config.precision),
            self.device,
        )

    def metrics_log(self, start: Start) -> MetricsLog:
        config, resolved = self.config, self.resolved
        run_config = {
            **config.to_dict(),
            "resolved_model": resolved.model.to_dict(),
            "world_size": self.world_size,
            "grad_accum": resolved.grad_accum,
            "total_steps": resolved.total_steps,
            "manifest_sha256": resolved.manifest_sha256,
        }
        resumed_step = self.counters.step if start.path is not None else None
        return MetricsLog(
            config.run_dir,
            config.run_name,
            config.logging.wandb,
            run_config,
            self.counters.wandb_run_id,
            resumed_step,
            resolved.total_steps,
        )

    def announce(self, num_parameters: int) -> None:
        config, resolved, ws = self.config, self.resolved, self.world_size
        print(
            f"run {config.run_name}: {resolved.model.mixer}, {num_parameters:,} parameters, {ws} rank(s) "
            f"on {self.device.type}, ZeRO-{resolved.zero_stage}, {config.precision}, "
            f"global batch {config.batch.global_batch_size} = {config.batch.micro_batch_size} x {ws} ranks "
            f"x {resolved.grad_accum} accumulation, {resolved.total_steps} steps, "
            f"{self.batches.batches_per_epoch * ws * config.batch.micro_batch_size:,} sequences per epoch",
            flush=True,
        )

    # ------------------------------------------------------------------------------------ the loop

    def train(self) -> RunOutcome:
        c, total = self.counters, self.resolved.total_steps
        stall = Watchdog.for_default_group(
            self.rank,
            self.world_size,
            self.config.train.stall_timeout_s,
            on_stall=lambda line: self.status.write("stalled", reason=line),
            may_requeue=lambda: self.status.faults_in_a_row() <= self.config.train.max_requeues_without_progress,
        ).start(c.step)
        with ckpt.StopSignals() as signals:
            try:
                while c.step < total:
                    stall.progress(c.step)
                    result = self.step(lambda: signals.received is not None)
                    stall.progress(c.step)
                    for hook in self.after_step:
                        hook(self.rank, c.step)
                    if self.metrics.due(c.step):
                        self.log_train()
                    if self.evaluator.due(c.step):
                        self.evaluate()
                        stall.progress(c.step)
                    if self.checkpointer.due(c.step, result.stop):
                        self.save_checkpoint()
                        stall.progress(c.step)
                    if result.stop and c.step < total:
                        self.outcome.status, self.outcome.signal = "stopped", signals.name or "a signal on another rank"
                        break
            except NonFiniteLossError as err:
                if self.rank == 0:
                    self.status.write("diverged", reason=f"{type(err).__name__}: {err}")
                raise
            except BaseException as err:
                stall.check_error(err)  # a collective that timed out: the stall exit (does not return)
                if self.rank == 0 or isinstance(
                    err, DataPipelineError
                ):  # a corrupt shard: the rank that read it says so
                    self.status.record_failure(err, signals.name)
                raise
            finally:
                stall.stop()
                self.close()
        return self.finish()

    def step(self, stop_requested: Callable[[], bool]) -> StepResult:
        """One optimizer update, and the counters, the metrics window and the sample-id log after it."""
        c = self.counters
        lr = self.engine.get_lr()[0]
        began = time.perf_counter()
        result = train_step(
            self.engine,
            self.batches,
            self.device,
            self.guard,
            stop_requested,
            *self.step_args,
            want_norm=self.metrics.due(c.step + 1),
        )
        c.step += 1
        self.status.step = c.step
        if self.config.metrics.sample_ids:
            write_sample_ids(self.config.run_dir, c.step, self.batches, self.rank, self.world_size)
        seconds = time.perf_counter() - began
        c.tokens += self.resolved.tokens_per_step
        c.train_seconds += seconds
        self.metrics.window.add(result.sums, result.grad_norm, seconds, lr)
        return result

    def log_train(self) -> None:
        c = self.counters
        c.last_train = self.metrics.record(
            c.step,
            {
                "tokens": c.tokens,
                "epoch": self.batches.cursor.epoch,
                "nonfinite_skipped": self.guard.total,
                "skipped_steps": int(getattr(self.engine, "skipped_steps", 0)),
            },
        )
        if self.log is not None:
            self.log.log(c.last_train)
            self.status.write("running")

    def evaluate(self) -> None:
        c = self.counters
        c.last_eval = {**self.evaluator(self.engine, c.step), "tokens": c.tokens, "train_seconds": c.train_seconds}
        if self.log is not None:
            self.log.log(c.last_eval)

    def save_checkpoint(self) -> None:
        self.status.checkpoint = self.outcome.checkpoint = str(
            self.checkpointer.save(self.counters.step, self.state_dict())
        )
        if self.rank == 0:
            self.status.write("running")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the engine and the RNG: the counters and the loader's cursor."""
        c, config, resolved = self.counters, self.config, self.resolved
        return {
            "run_name": config.run_name,
            "step": c.step,
            "tokens": c.tokens,
            "train_seconds": c.train_seconds,
            "cursor": self.batches.cursor.to_dict(),
            "world_size": self.world_size,
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
            "nonfinite_dropped": self.guard.total,
            "wandb_run_id": c.wandb_run_id,
            "last_train": c.last_train,
            "last_eval": c.last_eval,
        }

    def close(self) -> None:
        self.batches.close()
        if self.log is not None:
            self.log.summary(
                {f"final/{k}": v for k, v in (self.counters.last_eval or {}).items() if k not in ("kind",)}
            )
            self.log.close()

    def finish(self) -> RunOutcome:
        outcome = self.outcome
        outcome.step = self.counters.step
        if self.rank == 0:
            self.status.write(outcome.status, signal=outcome.signal)
            if outcome.stopped:
                print(
                    f"stopped by {outcome.signal} at step {outcome.step}; checkpoint at {outcome.checkpoint}; "
                    "resume with --resume auto",
                    flush=True,
                )
            else:
                print(f"completed {outcome.step} steps; checkpoint at {outcome.checkpoint}", flush=True)
        dist.barrier()
        return outcome


def run(
    config: PretrainConfig,
    resume: str | None = None,
    build_model: Callable[[EncoderConfig], nn.Module] = ForMaskedLM,
    after_step: Sequence[AfterStep] = (),
) -> RunOutcome:
    """Build a Trainer and train (see Trainer)."""
    return Trainer(config, resume, build_model, after_step).train()
