"""The one config parser for pretraining.

    config file (a shipped name or a path) -> `--set a.b=value` overrides -> `PretrainConfig`
    (validated: every mistake is reported, one line each) -> `resolve()` with the manifest and the
    world size -> `Resolved` (the model config, batch split, step count and the DeepSpeed config).

Nothing else in the project parses a pretraining config; `main.py`, `trainer.py` and `export.py`
take the typed config built here (pydantic models on common.config).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import math
import os
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import Field

from common.config import Section, apply_override, build, read_json_object
from common.config import parse_value as parse_value  # re-exported for callers of pretrain.config
from hypermixer import PRESETS, EncoderConfig
from hypermixer.config import EncoderConfigError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
Precision = Literal["fp32", "bf16", "fp16"]
Decay = Literal["linear", "cosine", "constant"]
WandbMode = Literal["online", "offline", "disabled"]
OptimizerImpl = Literal["auto", "torch", "deepspeed"]
Preset = Literal["tiny", "small", "base"]
PRECISIONS, DECAYS = typing.get_args(Precision), typing.get_args(Decay)
WANDB_MODES, OPTIMIZER_IMPLS = typing.get_args(WandbMode), typing.get_args(OptimizerImpl)
assert set(typing.get_args(Preset)) == set(PRESETS), "Preset must list hypermixer.PRESETS"
# DeepSpeed keys this config derives from its own sections: setting them under "deepspeed" would
# give two sources of truth, so they are refused with a pointer to the right field.
DERIVED_DEEPSPEED_KEYS = {
    "train_batch_size": "batch.global_batch_size",
    "train_micro_batch_size_per_gpu": "batch.micro_batch_size",
    "gradient_accumulation_steps": "batch.global_batch_size and batch.micro_batch_size",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "the optim section",
    "scheduler": "optim.warmup_steps / optim.decay",
}
PRECISION_KEYS = ("bf16", "fp16")  # their "enabled" comes from `precision`; their other options pass through


class ConfigError(ValueError):
    """One or more mistakes in a pretraining config; `problems` holds one message per mistake."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid pretraining config:\n" + "\n".join(f"  - {p}" for p in self.problems))


# ---------------------------------------------------------------------------------------- sections
# Typed sections (pydantic, strict types, unknown keys refused: common/config.py). The comment next
# to a field is its documentation: `python -m tools.config_reference` copies it into docs/config.md.


class DataConfig(Section):
    path: str | None = None  # a data_pipeline build folder or its manifest.json
    validation_path: str | None = None  # None: the same build; else another build (e.g. held-out text)
    validation_split: str = "validation"
    num_workers: int = Field(2, ge=0)  # DataLoader worker processes per rank
    # Virtual streams of the global sample order (pretrain/data.py): world size x max(1, num_workers) must
    # divide it, at the start and at every resume. Memory: a rank holds streams / world size x shuffle_shards
    # shard pieces; an epoch drops under one micro-batch per stream. Fixed for the run (part of the data order)
    streams: int = Field(16, ge=1)
    shuffle: bool = True  # per-epoch shard order and in-memory shuffle, seeded by (seed, epoch)
    shuffle_shards: int = Field(2, ge=1)  # shards a worker holds in memory and shuffles together
    mask_prob: float = Field(0.15, gt=0, lt=1)  # fraction of (non-special) tokens selected for prediction
    mask_token_prob: float = Field(0.8, ge=0, le=1)  # of those: replaced by [MASK]
    random_token_prob: float = Field(0.1, ge=0, le=1)  # of those: replaced by a random token; the rest stay unchanged

    def problems(self) -> list[str]:
        p = []
        if not self.path:
            p.append(
                "data.path: required (a data_pipeline build folder or its manifest.json; "
                "e.g. --set data.path=/data/shards)"
            )
        if self.mask_token_prob + self.random_token_prob > 1.0 + 1e-9:
            p.append(
                "data.mask_token_prob + data.random_token_prob must be <= 1, got "
                f"{self.mask_token_prob + self.random_token_prob}"
            )
        return p


class OptimConfig(Section):
    lr: float = Field(5e-4, gt=0)  # peak learning rate (AdamW)
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.98], min_length=2, max_length=2)
    eps: float = Field(1e-6, gt=0)
    weight_decay: float = Field(0.01, ge=0)  # not applied to biases and LayerNorm weights
    warmup_steps: int = Field(1000, ge=0)  # linear warmup: step s (0-based) runs at lr x (s + 1) / warmup_steps
    decay: Decay = "linear"  # after warmup: linear | cosine | constant
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # the decay ends at lr * min_lr_ratio
    total_steps: int | None = Field(None, gt=0)  # give exactly one of total_steps / total_tokens
    total_tokens: int | None = Field(None, gt=0)  # tokens = sequences * seq_len (padding included)
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 disables clipping
    implementation: OptimizerImpl = "auto"  # torch (torch.optim.AdamW) | deepspeed (FusedAdam / CPUAdam) | auto

    def problems(self) -> list[str]:
        p = []
        if not all(0.0 <= b < 1.0 for b in self.betas):
            p.append(f"optim.betas: must be two numbers in [0, 1), got {self.betas}")
        if (self.total_steps is None) == (self.total_tokens is None):
            p.append(
                "optim.total_steps: give exactly one of optim.total_steps and optim.total_tokens "
                f"(got total_steps={self.total_steps}, total_tokens={self.total_tokens})"
            )
        if self.total_steps is not None and self.warmup_steps > self.total_steps:
            p.append(f"optim.warmup_steps ({self.warmup_steps}) must not exceed optim.total_steps ({self.total_steps})")
        return p


class BatchConfig(Section):
    global_batch_size: int = Field(256, gt=0)  # sequences per optimizer step, all ranks together
    micro_batch_size: int = Field(32, gt=0)  # sequences per forward pass on one rank; accumulation is derived

    def problems(self) -> list[str]:
        if self.global_batch_size % self.micro_batch_size:
            return [
                f"batch.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"batch.micro_batch_size ({self.micro_batch_size})"
            ]
        return []


class TrainConfig(Section):
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    compile: bool = False  # torch.compile through DeepSpeed's engine.compile()
    max_nonfinite_in_a_row: int = Field(5, ge=1)  # abort after this many consecutive non-finite losses
    # Seconds without progress (a step, an evaluation or a checkpoint) before every rank exits with code 75
    # (requeue-able), naming the stalled rank; also the timeout of every process group, DeepSpeed's included.
    stall_timeout_s: float = Field(600.0, ge=5)
    # Faults in a row (a stall, a crash, a killed rank...) with no new checkpoint between them that an automatic
    # restart (torchrun's, a SLURM requeue) still continues after; past it the run exits 5, which no launcher
    # requeues: a run stuck at one place is not restarted forever. A person's relaunch starts the count again.
    max_requeues_without_progress: int = Field(3, ge=0)


class EvalConfig(Section):
    every_steps: int = Field(1000, ge=0)  # 0: only at the end
    max_samples: int | None = Field(None, gt=0)  # cap on validation sequences (None: the whole split)
    micro_batch_size: int | None = Field(None, gt=0)  # None: batch.micro_batch_size


class CheckpointConfig(Section):
    dir: str | None = None  # None: <output_dir>/checkpoints
    every_steps: int = Field(1000, ge=0)  # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = Field(3, ge=1)  # older complete checkpoints are deleted


class WandbConfig(Section):
    mode: WandbMode = "offline"  # online | offline | disabled
    project: str = "hypermixer-pretrain"
    entity: str | None = None
    name: str | None = None  # None: the run name
    tags: list[str] = Field(default_factory=list)


class LoggingConfig(Section):
    every_steps: int = Field(10, ge=1)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


class MetricsConfig(Section):
    # Peak FLOP/s of one device for MFU. None: a known GPU's dense bf16/fp16 peak; no MFU on CPU.
    peak_tflops: float | None = Field(None, gt=0)
    # Append each step's training sequences, all ranks, as [shard, index] rows to <run>/sample_ids.jsonl
    # (rank 0 writes; an audit of the data order: nothing skipped or repeated across resumes)
    sample_ids: bool = False


def _model_section() -> type[Section]:
    """The `model` section, typed from EncoderConfig's own fields (one source of truth): every field
    optional (unset: the preset's value, else EncoderConfig's default; vocab_size, max_seq_len and
    pad_token_id: the data's), plus `preset`."""
    hints = typing.get_type_hints(EncoderConfig)
    fields: dict[str, Any] = {"preset": (Preset | None, "base")}
    for f in dataclasses.fields(EncoderConfig):  # its type (Literal choices included) and bounds
        kind = hints[f.name]
        fields[f.name] = (kind if type(None) in typing.get_args(kind) else kind | None, Field(None, **f.metadata))
    return pydantic.create_model("ModelConfig", __base__=Section, **fields)


if typing.TYPE_CHECKING:  # built at run time from EncoderConfig's fields; a type checker sees Any
    ModelConfig = Any
else:
    ModelConfig = _model_section()


def _model_problems(model: Any) -> list[str]:
    # The checks across fields; the data fills vocab_size / max_seq_len / pad_token_id later: stand-ins now.
    try:
        encoder_config(
            model, vocab_size=model.vocab_size or 30522, seq_len=model.max_seq_len or 8, pad_id=model.pad_token_id or 0
        )
    except EncoderConfigError as err:
        return [f"model.{problem}" for problem in err.problems]
    return []


ModelConfig.problems = _model_problems


class PretrainConfig(Section):
    name: str | None = None  # None: "<config file stem>-<mixer>"
    output_dir: str | None = None  # None: runs/<name> (relative paths are relative to the working dir)
    seed: int = Field(0, ge=0)  # model init, dropout, data order and masks
    precision: Precision = "bf16"  # fp32 | bf16 | fp16
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    batch: BatchConfig = Field(default_factory=BatchConfig)
    deepspeed: dict[str, Any] = Field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    source: str = Field("", exclude=True)  # where the config came from (not a setting; filled by load_config)

    def problems(self) -> list[str]:
        return super().problems() + deepspeed_problems(self.deepspeed)

    def to_dict(self) -> dict[str, Any]:
        out = self.model_dump()
        out["model"] = {k: v for k, v in out["model"].items() if v is not None}  # what was set, as written
        return out

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.source).stem if self.source else "run"
        return f"{stem}-{self.model.mixer or 'hypermixer'}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.run_name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


def deepspeed_problems(ds: dict[str, Any]) -> list[str]:
    """The `deepspeed` section passes through to DeepSpeed, except what this config derives."""
    p = [
        f"deepspeed.{key}: derived by this config; set {instead} instead"
        for key, instead in DERIVED_DEEPSPEED_KEYS.items()
        if key in ds
    ]
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        p.append(f"deepspeed.zero_optimization: expected an object, got {json.dumps(zero)}")
    elif zero.get("stage", 0) not in (0, 1, 2, 3):
        p.append(f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {zero.get('stage')!r}")
    for key in PRECISION_KEYS:
        section = ds.get(key, {})
        if not isinstance(section, dict):
            p.append(f"deepspeed.{key}: expected an object, got {json.dumps(section)}")
        elif "enabled" in section:
            p.append(f"deepspeed.{key}.enabled: derived by this config; set precision instead")
    return p


# ---------------------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.json"))


def config_path(name_or_path: str) -> Path:
    """`tiny`, `tiny.json` -> the shipped config; anything else is a path, used as given."""
    bare = os.sep not in name_or_path and "/" not in name_or_path
    stem = name_or_path[:-5] if name_or_path.endswith(".json") else name_or_path
    if bare and stem in shipped_configs():
        return CONFIG_DIR / f"{stem}.json"
    path = Path(name_or_path)
    if not path.is_file():
        close = difflib.get_close_matches(stem, shipped_configs(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            [
                f"config {name_or_path!r}: no such file, and not a shipped config{hint} "
                f"(shipped: {', '.join(shipped_configs())})"
            ]
        )
    return path


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a config, apply `--set` overrides, validate. Raises ConfigError listing every mistake."""
    path = config_path(name_or_path)
    raw, problem = read_json_object(path)
    if raw is None:
        raise ConfigError([str(problem)])
    problems: list[str] = []
    sources: dict[str, str] = {}
    for item in overrides:
        key, problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
        else:
            sources[str(key)] = f"--set {item}"
    config, found = from_dict(raw, sources, str(path))
    config.source = str(path)
    if problems + found:
        raise ConfigError(problems + found)
    return config


def from_dict(
    raw: dict[str, Any], sources: dict[str, str] | None = None, default_source: str = ""
) -> tuple[PretrainConfig, list[str]]:
    """The config and every mistake in it (mistaken keys keep their defaults, so the rest is still checked)."""
    config, problems = build(PretrainConfig, raw, sources, default_source)
    if config is None:  # unreachable: every key has a default (kept for the type checker)
        raise ConfigError(problems)
    return config, problems


def encoder_config(model: Any, vocab_size: int, seq_len: int, pad_id: int) -> EncoderConfig:
    """The model section on top of its preset; unset vocab_size / max_seq_len / pad_token_id come from the data."""
    explicit = {k: v for k, v in model.model_dump().items() if v is not None and k != "preset"}
    values = {**(PRESETS[model.preset] if model.preset else {}), **explicit}
    if "vocab_size" not in explicit:
        values["vocab_size"] = vocab_size
    if "max_seq_len" not in explicit:
        values["max_seq_len"] = seq_len
    if "pad_token_id" not in explicit:
        values["pad_token_id"] = pad_id
    return EncoderConfig.from_dict(values)


# ---------------------------------------------------------------------------------------- resolving


@dataclass
class Resolved:
    """Everything derived from the config, the data and the world size; computed once, before training."""

    config: PretrainConfig
    model: EncoderConfig
    manifest: dict[str, Any]
    manifest_sha256: str
    validation_manifest: dict[str, Any]
    world_size: int
    grad_accum: int
    total_steps: int
    seq_len: int
    deepspeed: dict[str, Any]

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch.global_batch_size * self.seq_len

    def fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the checkpoint (the rest, e.g. logging, may change)."""
        c = self.config
        data = c.data.model_dump()
        for free in ("path", "validation_path", "validation_split", "num_workers"):  # the order ignores them
            data.pop(free)
        return {
            "model": self.model.to_dict(),
            "data": data,
            "manifest_sha256": self.manifest_sha256,
            "seed": c.seed,
            "precision": c.precision,
            "batch": c.batch.model_dump(),
            "zero_stage": self.zero_stage,
        }

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


def resolve(config: PretrainConfig, world_size: int) -> Resolved:
    """Read the manifest(s) and derive the model, batch split, steps and DeepSpeed config."""
    problems: list[str] = []
    manifest, manifest_sha256, validation_manifest = read_data(config, problems)
    seq_len = int(manifest["seq_len"])
    model = model_for_data(config, manifest, problems)
    grad_accum = batch_split(config, manifest, world_size, problems)
    b, o = config.batch, config.optim
    total_steps = o.total_steps or math.ceil((o.total_tokens or 0) / (b.global_batch_size * seq_len))
    if o.warmup_steps > total_steps:
        problems.append(f"optim.warmup_steps ({o.warmup_steps}) exceeds the run's {total_steps} steps")
    if problems or model is None:
        raise ConfigError(problems)
    return Resolved(
        config=config,
        model=model,
        manifest=manifest,
        manifest_sha256=manifest_sha256,
        validation_manifest=validation_manifest,
        world_size=world_size,
        grad_accum=grad_accum,
        total_steps=total_steps,
        seq_len=seq_len,
        deepspeed=deepspeed_config(config, grad_accum),
    )


def read_data(config: PretrainConfig, problems: list[str]) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(the training manifest, its sha256, the validation manifest); what is wrong with them goes to `problems`."""
    from common.files import sha256_file
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.shards import MANIFEST_NAME, read_manifest

    if not config.data.path:
        raise ConfigError(["data.path: required (a data_pipeline build folder or its manifest.json)"])
    try:
        manifest = read_manifest(config.data.path)
    except DataPipelineError as err:
        raise ConfigError([f"data.path: {err}"]) from None
    manifest_file = Path(manifest["_root"]) / MANIFEST_NAME
    manifest_sha256 = sha256_file(manifest_file)
    validation_manifest = manifest
    if config.data.validation_path:
        try:
            validation_manifest = read_manifest(config.data.validation_path)
        except DataPipelineError as err:
            problems.append(f"data.validation_path: {err}")

    if "train" not in manifest["splits"] or not manifest["splits"]["train"]["shards"]:
        problems.append(f"data.path: {manifest_file} has no train shards")
    split = config.data.validation_split
    if split not in validation_manifest.get("splits", {}):
        problems.append(
            f"data.validation_split: {split!r} is not a split of "
            f"{validation_manifest['_root']} (has {', '.join(validation_manifest.get('splits', {}))})"
        )
    elif validation_manifest is not manifest:
        for key in ("seq_len", "vocab_size"):
            if validation_manifest[key] != manifest[key]:
                problems.append(
                    f"data.validation_path: {key} {validation_manifest[key]} differs from the "
                    f"training data's {manifest[key]}"
                )
        if validation_manifest["tokenizer"].get("sha256") != manifest["tokenizer"].get("sha256"):
            problems.append("data.validation_path: built with another tokenizer than data.path (sha256 differs)")
    return manifest, manifest_sha256, validation_manifest


def model_for_data(config: PretrainConfig, manifest: dict[str, Any], problems: list[str]) -> EncoderConfig | None:
    """The encoder config for this data (None when the model section is wrong; the mistakes go to `problems`)."""
    seq_len, pad = int(manifest["seq_len"]), manifest["special_ids"]["pad"]
    try:
        model = encoder_config(config.model, manifest["vocab_size"], seq_len, pad)
    except EncoderConfigError as err:
        problems += [f"model.{problem}" for problem in err.problems]
        return None
    if model.vocab_size < manifest["vocab_size"]:
        problems.append(
            f"model.vocab_size ({model.vocab_size}) is smaller than the data's vocabulary ({manifest['vocab_size']})"
        )
    if model.max_seq_len < seq_len:
        problems.append(f"model.max_seq_len ({model.max_seq_len}) is shorter than the data's seq_len ({seq_len})")
    if model.pad_token_id != pad:
        problems.append(f"model.pad_token_id ({model.pad_token_id}) differs from the data's pad id ({pad})")
    return model


def batch_split(config: PretrainConfig, manifest: dict[str, Any], world_size: int, problems: list[str]) -> int:
    """Gradient accumulation steps for this world size (1 when the batch does not split; then `problems` says why)."""
    from pretrain.data import Layout

    b = config.batch
    if "train" in manifest["splits"]:
        train_samples = sum(int(s["samples"]) for s in manifest["splits"]["train"]["shards"])
        layout = Layout(0, world_size, config.data.num_workers, b.micro_batch_size, config.data.streams)
        if layout.problem():
            problems.append(f"{layout.problem()}; set data.num_workers or data.streams (at the run's start)")
        elif train_samples and layout.batches_per_epoch(train_samples) == 0:
            problems.append(
                f"data.path: the train split has {train_samples} sequences, fewer than one micro-batch "
                f"({b.micro_batch_size}) for each of the {layout.streams} streams (data.streams); lower "
                "batch.micro_batch_size or data.streams"
            )
    per_step = b.micro_batch_size * world_size
    grad_accum = b.global_batch_size // per_step if per_step else 0
    if grad_accum < 1 or b.global_batch_size % per_step:
        problems.append(
            f"batch: global_batch_size ({b.global_batch_size}) must be a multiple of micro_batch_size "
            f"({b.micro_batch_size}) x world size ({world_size}) = {per_step}"
        )
        grad_accum = 1
    return grad_accum


def deepspeed_config(config: PretrainConfig, grad_accum: int) -> dict[str, Any]:
    """The DeepSpeed config: our derived keys plus the `deepspeed` section passed through."""
    o, b = config.optim, config.batch
    passthrough = copy.deepcopy(config.deepspeed)
    precision_options = {key: passthrough.pop(key, {}) for key in PRECISION_KEYS}
    zero = passthrough.setdefault("zero_optimization", {"stage": 0})
    offloads_optimizer = zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)
    impl = o.implementation
    if impl == "auto":
        # torch's AdamW needs no compiled op; ZeRO-Offload needs DeepSpeed's CPU Adam.
        impl = "deepspeed" if offloads_optimizer else "torch"
    ds: dict[str, Any] = {
        "train_batch_size": b.global_batch_size,
        "train_micro_batch_size_per_gpu": b.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": impl == "torch",
            },
        },
        "bf16": {**precision_options["bf16"], "enabled": config.precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0); deepspeed.fp16.* overrides these defaults
        "fp16": {
            "loss_scale": 0,
            "initial_scale_power": 16,
            "loss_scale_window": 1000,
            "hysteresis": 2,
            "min_loss_scale": 1,
            **precision_options["fp16"],
            "enabled": config.precision == "fp16",
        },
        "steps_per_print": 2**62,  # our metrics report progress; DeepSpeed's own print would duplicate it
        "wall_clock_breakdown": False,
    }
    ds.update(passthrough)
    return ds


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, path + ".")
        elif a != b:
            out.append(path)
    return out
