"""The one config parser for pretraining.

    config file (a shipped name or a path) -> `--set a.b=value` overrides -> `PretrainConfig`
    (validated: every mistake is reported, one line each) -> `resolve()` with the manifest and the
    world size -> `Resolved` (the model config, batch split, step count and the DeepSpeed config).

Nothing else in the project parses a pretraining config; `main.py`, `trainer.py` and `export.py`
take the dataclasses built here.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hypermixer import EncoderConfig, PRESETS

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PRECISIONS = ("fp32", "bf16", "fp16")
DECAYS = ("linear", "cosine", "constant")
WANDB_MODES = ("online", "offline", "disabled")
OPTIMIZER_IMPLS = ("auto", "torch", "deepspeed")
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


@dataclass
class DataConfig:
    path: str | None = None  # a data_pipeline build folder or its manifest.json
    validation_path: str | None = None  # None: the same build; else another build (e.g. held-out text)
    validation_split: str = "validation"
    num_workers: int = 2  # DataLoader worker processes per rank
    # Virtual streams of the global sample order (pretrain/data.py): world size x max(1, num_workers) must
    # divide it, at the start and at every resume. Memory: a rank holds streams / world size x shuffle_shards
    # shard pieces; an epoch drops under one micro-batch per stream. Fixed for the run (part of the data order)
    streams: int = 16
    shuffle: bool = True  # per-epoch shard order and in-memory shuffle, seeded by (seed, epoch)
    shuffle_shards: int = 2  # shards a worker holds in memory and shuffles together
    mask_prob: float = 0.15  # fraction of (non-special) tokens selected for prediction
    mask_token_prob: float = 0.8  # of those: replaced by [MASK]
    random_token_prob: float = 0.1  # of those: replaced by a random token; the rest stay unchanged


@dataclass
class OptimConfig:
    lr: float = 5e-4  # peak learning rate (AdamW)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01  # not applied to biases and LayerNorm weights
    warmup_steps: int = 1000  # linear warmup from 0
    decay: str = "linear"  # after warmup: linear | cosine | constant
    min_lr_ratio: float = 0.0  # the decay ends at lr * min_lr_ratio
    total_steps: int | None = None  # give exactly one of total_steps / total_tokens
    total_tokens: int | None = None  # tokens = sequences * seq_len (padding included)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    implementation: str = "auto"  # torch (torch.optim.AdamW) | deepspeed (FusedAdam / CPUAdam) | auto


@dataclass
class BatchConfig:
    global_batch_size: int = 256  # sequences per optimizer step, all ranks together
    micro_batch_size: int = 32  # sequences per forward pass on one rank; accumulation is derived


@dataclass
class TrainConfig:
    activation_checkpointing: bool = False  # recompute each block in backward (less memory)
    compile: bool = False  # torch.compile through DeepSpeed's engine.compile()
    max_nonfinite_in_a_row: int = 5  # abort after this many consecutive non-finite losses
    # Seconds without progress (a step, an evaluation or a checkpoint) before every rank exits with code 75
    # (requeue-able), naming the stalled rank; also the timeout of every process group, DeepSpeed's included.
    stall_timeout_s: float = 600.0


@dataclass
class EvalConfig:
    every_steps: int = 1000  # 0: only at the end
    max_samples: int | None = None  # cap on validation sequences (None: the whole split)
    micro_batch_size: int | None = None  # None: batch.micro_batch_size


@dataclass
class CheckpointConfig:
    dir: str | None = None  # None: <output_dir>/checkpoints
    every_steps: int = 1000  # 0: only at the end and on SIGTERM/SIGUSR1
    keep_last: int = 3  # older complete checkpoints are deleted


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "hypermixer-pretrain"
    entity: str | None = None
    name: str | None = None  # None: the run name
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    every_steps: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class MetricsConfig:
    # Peak FLOP/s of one device for MFU. None: a known GPU's dense bf16/fp16 peak; no MFU on CPU.
    peak_tflops: float | None = None
    # Append each step's training sequences, all ranks, as [shard, index] rows to <run>/sample_ids.jsonl
    # (rank 0 writes; an audit of the data order: nothing skipped or repeated across resumes)
    sample_ids: bool = False


@dataclass
class PretrainConfig:
    name: str | None = None  # None: "<config file stem>-<mixer>"
    output_dir: str | None = None  # None: runs/<name> (relative paths are relative to the working dir)
    seed: int = 0  # model init, dropout, data order and masks
    precision: str = "bf16"  # fp32 | bf16 | fp16
    model: dict[str, Any] = field(default_factory=lambda: {"preset": "base"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    deepspeed: dict[str, Any] = field(default_factory=lambda: {"zero_optimization": {"stage": 2}})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = ""  # where the config came from (not a setting; filled by load_config)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out.pop("source")
        return out

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.source).stem if self.source else "run"
        return f"{stem}-{self.model.get('mixer', 'hypermixer')}"

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.run_name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


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
        raise ConfigError([f"config {name_or_path!r}: no such file, and not a shipped config "
                           f"(shipped: {', '.join(shipped_configs())})"])
    return path


def load_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Read a config, apply `--set` overrides, validate. Raises ConfigError listing every mistake."""
    path = config_path(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError([f"{path}: not valid JSON ({err})"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a JSON object"])
    problems: list[str] = []
    for item in overrides:
        problem = apply_override(raw, item)
        if problem:
            problems.append(problem)
    config = from_dict(raw, problems)
    config.source = str(path)
    # Keys with a structural problem (unknown, wrong type) fell back to defaults: report them once.
    # (`optim.lrr` unknown does not hide `optim.lr`: keys match whole dotted parts.)
    flagged = {problem.split(":")[0] for problem in problems}
    problems += [problem for problem in validate(config)
                 if not any(key == problem.split(":")[0] or key.startswith(problem.split(":")[0] + ".")
                            for key in flagged)]
    if problems:
        raise ConfigError(problems)
    return config


def parse_value(text: str) -> Any:
    """`--set` values are JSON where they parse as JSON (numbers, true, null, lists), else strings."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> str | None:
    """Apply one `a.b.c=value` to the raw config dict; return a problem message or None."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        return f"--set {item!r}: expected section.key=value"
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return f"--set {item!r}: {'.'.join(parts[:depth + 1])} is not a section"
        node = child
    node[parts[-1]] = parse_value(value)
    return None


def from_dict(raw: dict[str, Any], problems: list[str]) -> PretrainConfig:
    """Build the dataclasses from a dict, recording unknown keys and wrong types in `problems`
    (those keys keep their defaults, so the rest can still be checked)."""
    return _build(PretrainConfig, raw, "", problems)


def _build(cls: type, values: Any, where: str, problems: list[str]) -> Any:
    if not isinstance(values, dict):
        problems.append(f"{where or 'config'}: expected an object, got {json.dumps(values)}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.name != "source"}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else key
        if key not in fields:
            problems.append(f"{path}: unknown key (known: {', '.join(sorted(fields))})")
            continue
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, path, problems)
        elif _type_ok(kind, value):
            kwargs[key] = copy.deepcopy(value)
        else:
            problems.append(f"{path}: expected {_type_name(kind)}, got {json.dumps(value)}")
    return cls(**kwargs)


def _type_ok(kind: Any, value: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(arg, value) for arg in args)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is str:
        return isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_type_ok(args[0], v) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    return True


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if kind is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(args[0])}"
    if origin is dict:
        return "an object"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(kind, str(kind))


# ---------------------------------------------------------------------------------------- validation


def validate(c: PretrainConfig) -> list[str]:
    """Every check that needs no data and no world size. One message per mistake."""
    p: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            p.append(message)

    need(c.precision in PRECISIONS, f"precision: must be one of {', '.join(PRECISIONS)}, got {c.precision!r}")
    need(c.seed >= 0, f"seed: must be >= 0, got {c.seed}")
    p += _model_problems(c.model)

    d = c.data
    need(bool(d.path), "data.path: required (a data_pipeline build folder or its manifest.json; "
                       "e.g. --set data.path=/data/shards)")
    need(d.num_workers >= 0, f"data.num_workers: must be >= 0, got {d.num_workers}")
    need(d.shuffle_shards >= 1, f"data.shuffle_shards: must be >= 1, got {d.shuffle_shards}")
    need(d.streams >= 1, f"data.streams: must be >= 1, got {d.streams}")
    need(0.0 < d.mask_prob < 1.0, f"data.mask_prob: must be in (0, 1), got {d.mask_prob}")
    for name in ("mask_token_prob", "random_token_prob"):
        value = getattr(d, name)
        need(0.0 <= value <= 1.0, f"data.{name}: must be in [0, 1], got {value}")
    need(d.mask_token_prob + d.random_token_prob <= 1.0 + 1e-9,
         f"data.mask_token_prob + data.random_token_prob must be <= 1, got {d.mask_token_prob + d.random_token_prob}")

    o = c.optim
    need(o.lr > 0, f"optim.lr: must be > 0, got {o.lr}")
    need(len(o.betas) == 2 and all(0.0 <= b < 1.0 for b in o.betas),
         f"optim.betas: must be two numbers in [0, 1), got {o.betas}")
    need(o.eps > 0, f"optim.eps: must be > 0, got {o.eps}")
    need(o.weight_decay >= 0, f"optim.weight_decay: must be >= 0, got {o.weight_decay}")
    need(o.warmup_steps >= 0, f"optim.warmup_steps: must be >= 0, got {o.warmup_steps}")
    need(o.decay in DECAYS, f"optim.decay: must be one of {', '.join(DECAYS)}, got {o.decay!r}")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio: must be in [0, 1], got {o.min_lr_ratio}")
    need(o.grad_clip >= 0, f"optim.grad_clip: must be >= 0 (0 disables), got {o.grad_clip}")
    need(o.implementation in OPTIMIZER_IMPLS,
         f"optim.implementation: must be one of {', '.join(OPTIMIZER_IMPLS)}, got {o.implementation!r}")
    if (o.total_steps is None) == (o.total_tokens is None):
        p.append("optim: give exactly one of total_steps and total_tokens "
                 f"(got total_steps={o.total_steps}, total_tokens={o.total_tokens})")
    for name in ("total_steps", "total_tokens"):
        value = getattr(o, name)
        need(value is None or value > 0, f"optim.{name}: must be > 0, got {value}")
    if o.total_steps is not None:
        need(o.warmup_steps <= o.total_steps,
             f"optim.warmup_steps ({o.warmup_steps}) must not exceed optim.total_steps ({o.total_steps})")

    b = c.batch
    need(b.global_batch_size > 0, f"batch.global_batch_size: must be > 0, got {b.global_batch_size}")
    need(b.micro_batch_size > 0, f"batch.micro_batch_size: must be > 0, got {b.micro_batch_size}")
    if b.global_batch_size > 0 and b.micro_batch_size > 0:
        need(b.global_batch_size % b.micro_batch_size == 0,
             f"batch.global_batch_size ({b.global_batch_size}) must be a multiple of "
             f"batch.micro_batch_size ({b.micro_batch_size})")

    zero = c.deepspeed.get("zero_optimization", {})
    for key, instead in DERIVED_DEEPSPEED_KEYS.items():
        need(key not in c.deepspeed, f"deepspeed.{key}: derived by this config; set {instead} instead")
    if not isinstance(zero, dict):
        p.append(f"deepspeed.zero_optimization: expected an object, got {json.dumps(zero)}")
    else:
        stage = zero.get("stage", 0)
        need(stage in (0, 1, 2, 3), f"deepspeed.zero_optimization.stage: must be 0, 1, 2 or 3, got {stage!r}")
    for key in PRECISION_KEYS:
        section = c.deepspeed.get(key, {})
        if not isinstance(section, dict):
            p.append(f"deepspeed.{key}: expected an object, got {json.dumps(section)}")
        else:
            need("enabled" not in section, f"deepspeed.{key}.enabled: derived by this config; set precision instead")

    need(c.train.stall_timeout_s >= 5, f"train.stall_timeout_s: must be >= 5 (seconds), got {c.train.stall_timeout_s}")
    need(c.train.max_nonfinite_in_a_row >= 1,
         f"train.max_nonfinite_in_a_row: must be >= 1, got {c.train.max_nonfinite_in_a_row}")
    need(c.eval.every_steps >= 0, f"eval.every_steps: must be >= 0, got {c.eval.every_steps}")
    need(c.eval.max_samples is None or c.eval.max_samples > 0,
         f"eval.max_samples: must be > 0 or null, got {c.eval.max_samples}")
    need(c.eval.micro_batch_size is None or c.eval.micro_batch_size > 0,
         f"eval.micro_batch_size: must be > 0 or null, got {c.eval.micro_batch_size}")
    need(c.checkpoint.every_steps >= 0, f"checkpoint.every_steps: must be >= 0, got {c.checkpoint.every_steps}")
    need(c.checkpoint.keep_last >= 1, f"checkpoint.keep_last: must be >= 1, got {c.checkpoint.keep_last}")
    need(c.logging.every_steps >= 1, f"logging.every_steps: must be >= 1, got {c.logging.every_steps}")
    need(c.logging.wandb.mode in WANDB_MODES,
         f"logging.wandb.mode: must be one of {', '.join(WANDB_MODES)}, got {c.logging.wandb.mode!r}")
    need(c.metrics.peak_tflops is None or c.metrics.peak_tflops > 0,
         f"metrics.peak_tflops: must be > 0 or null, got {c.metrics.peak_tflops}")
    return p


def _model_problems(model: dict[str, Any]) -> list[str]:
    preset = model.get("preset")
    if preset is not None and preset not in PRESETS:
        return [f"model.preset: must be one of {', '.join(PRESETS)} or null, got {preset!r}"]
    known = {f.name for f in dataclasses.fields(EncoderConfig)} | {"preset"}
    unknown = sorted(set(model) - known)
    if unknown:
        return [f"model.{key}: unknown key (known: {', '.join(sorted(known))})" for key in unknown]
    # The data fills vocab_size / max_seq_len / pad_token_id later; check the rest now with stand-ins.
    try:
        encoder_config(model, vocab_size=model.get("vocab_size") or 30522, seq_len=model.get("max_seq_len") or 8,
                       pad_id=model.get("pad_token_id", 0))
    except ValueError as err:
        return [f"model: {err}"]
    return []


def encoder_config(model: dict[str, Any], vocab_size: int, seq_len: int, pad_id: int) -> EncoderConfig:
    """The model section on top of its preset; unset vocab_size / max_seq_len / pad_token_id come from the data."""
    values = dict(PRESETS[model["preset"]]) if model.get("preset") else {}
    values.update({k: v for k, v in model.items() if k != "preset"})
    explicit = {k for k in model if k != "preset"}
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
        data = dataclasses.asdict(c.data)
        for free in ("path", "validation_path", "validation_split", "num_workers"):  # the order ignores them
            data.pop(free)
        return {
            "model": self.model.to_dict(), "data": data, "manifest_sha256": self.manifest_sha256,
            "seed": c.seed, "precision": c.precision, "batch": dataclasses.asdict(c.batch),
            "zero_stage": self.zero_stage,
        }

    @property
    def zero_stage(self) -> int:
        return int(self.deepspeed.get("zero_optimization", {}).get("stage", 0))


def resolve(config: PretrainConfig, world_size: int) -> Resolved:
    """Read the manifest(s) and derive the model, batch split, steps and DeepSpeed config."""
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.shards import MANIFEST_NAME, read_manifest

    problems: list[str] = []
    try:
        manifest = read_manifest(config.data.path)
    except DataPipelineError as err:
        raise ConfigError([f"data.path: {err}"]) from None
    manifest_file = Path(manifest["_root"]) / MANIFEST_NAME
    manifest_sha256 = hashlib.sha256(manifest_file.read_bytes()).hexdigest()
    validation_manifest = manifest
    if config.data.validation_path:
        try:
            validation_manifest = read_manifest(config.data.validation_path)
        except DataPipelineError as err:
            problems.append(f"data.validation_path: {err}")
    seq_len = int(manifest["seq_len"])

    if "train" not in manifest["splits"] or not manifest["splits"]["train"]["shards"]:
        problems.append(f"data.path: {manifest_file} has no train shards")
    split = config.data.validation_split
    if split not in validation_manifest.get("splits", {}):
        problems.append(f"data.validation_split: {split!r} is not a split of "
                        f"{validation_manifest['_root']} (has {', '.join(validation_manifest.get('splits', {}))})")
    elif validation_manifest is not manifest:
        for key in ("seq_len", "vocab_size"):
            if validation_manifest[key] != manifest[key]:
                problems.append(f"data.validation_path: {key} {validation_manifest[key]} differs from the "
                                f"training data's {manifest[key]}")
        if validation_manifest["tokenizer"].get("sha256") != manifest["tokenizer"].get("sha256"):
            problems.append("data.validation_path: built with another tokenizer than data.path (sha256 differs)")

    model = None
    try:
        model = encoder_config(config.model, manifest["vocab_size"], seq_len, manifest["special_ids"]["pad"])
    except ValueError as err:
        problems.append(f"model: {err}")
    if model is not None:
        if model.vocab_size < manifest["vocab_size"]:
            problems.append(f"model.vocab_size ({model.vocab_size}) is smaller than the data's vocabulary "
                            f"({manifest['vocab_size']})")
        if model.max_seq_len < seq_len:
            problems.append(f"model.max_seq_len ({model.max_seq_len}) is shorter than the data's seq_len ({seq_len})")
        if model.pad_token_id != manifest["special_ids"]["pad"]:
            problems.append(f"model.pad_token_id ({model.pad_token_id}) differs from the data's pad id "
                            f"({manifest['special_ids']['pad']})")

    b = config.batch
    if "train" in manifest["splits"]:
        from pretrain.data import Layout

        train_samples = sum(int(s["samples"]) for s in manifest["splits"]["train"]["shards"])
        layout = Layout(0, world_size, config.data.num_workers, b.micro_batch_size, config.data.streams)
        if layout.problem():
            problems.append(f"{layout.problem()}; set data.num_workers or data.streams (at the run's start)")
        elif train_samples and layout.batches_per_epoch(train_samples) == 0:
            problems.append(
                f"data.path: the train split has {train_samples} sequences, fewer than one micro-batch "
                f"({b.micro_batch_size}) for each of the {layout.streams} streams (data.streams); lower "
                "batch.micro_batch_size or data.streams")
    per_step = b.micro_batch_size * world_size
    grad_accum = b.global_batch_size // per_step if per_step else 0
    if grad_accum < 1 or b.global_batch_size % per_step:
        problems.append(
            f"batch: global_batch_size ({b.global_batch_size}) must be a multiple of micro_batch_size "
            f"({b.micro_batch_size}) x world size ({world_size}) = {per_step}")
        grad_accum = 1
    o = config.optim
    total_steps = o.total_steps or math.ceil(o.total_tokens / (b.global_batch_size * seq_len))
    if o.warmup_steps > total_steps:
        problems.append(f"optim.warmup_steps ({o.warmup_steps}) exceeds the run's {total_steps} steps")
    if problems:
        raise ConfigError(problems)
    return Resolved(
        config=config, model=model, manifest=manifest, manifest_sha256=manifest_sha256,
        validation_manifest=validation_manifest, world_size=world_size, grad_accum=grad_accum,
        total_steps=total_steps, seq_len=seq_len, deepspeed=deepspeed_config(config, grad_accum),
    )


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
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": impl == "torch"},
        },
        "bf16": {**precision_options["bf16"], "enabled": config.precision == "bf16"},
        # fp16: dynamic loss scaling (loss_scale 0); deepspeed.fp16.* overrides these defaults
        "fp16": {"loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000, "hysteresis": 2,
                 "min_loss_scale": 1, **precision_options["fp16"], "enabled": config.precision == "fp16"},
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
