"""Cluster options: one dataclass, loaded from a JSON file and overridden by CLI flags, mapped
onto `submitit.AutoExecutor` in one function (`executor_kwargs`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from common.config import Checked


class OptionsError(ValueError):
    """A bad cluster option; its message is one line meant for the user."""


# Signals the job may get before its limit. USR1 is out: some NCCL versions catch it (submitit moved to
# USR2 for that reason), and TERM/USR1 are what the training itself handles, so they cannot also carry
# "requeue me" (see docs/slurm.md).
ALLOWED_SIGNALS = ("USR2", "HUP")


class ClusterOptions(Checked):
    """The cluster options of `python -m slurm`: a typed section like every other config; the CLI flags
    are made from these fields and their descriptions."""

    error = OptionsError
    label = "invalid cluster options"

    partition: str | None = Field(None, description="partition (-p)")
    account: str | None = Field(None, description="account to charge (-A)")
    qos: str | None = Field(None, description="quality of service")
    time_min: int = Field(60, ge=1, description="time limit in minutes")
    nodes: int = Field(1, ge=1, description="number of nodes")
    gpus_per_node: int = Field(0, ge=0, description="GPUs per node (0: CPU job)")
    tasks_per_node: int | None = Field(
        None, ge=1, description="tasks (ranks) per node; default one per GPU, or 1 on CPU"
    )
    cpus_per_task: int | None = Field(None, ge=1, description="CPUs per task (data loader workers + 1 is a good start)")
    mem_gb: float | None = Field(None, gt=0, description="memory per node in GB; default: the cluster's")
    constraint: str | None = Field(None, description="node feature constraint (-C), e.g. a100")
    exclusive: bool = Field(False, description="whole nodes only")
    sbatch_args: dict[str, Any] = Field(
        default_factory=dict, description="extra #SBATCH options, e.g. mail-type=END (flag alone: true)"
    )
    srun_args: list[str] = Field(
        default_factory=list, description="extra srun arguments, e.g. --srun-arg=--cpu-bind=none"
    )
    setup: list[str] = Field(default_factory=list, description="shell line run before srun, e.g. 'module load cuda'")
    job_folder: str = Field("runs/slurm/%j", description="folder for submitit's pickles and logs; %j is the job id")
    job_name: str | None = Field(None, description="job name; default: the stage's name")
    array_parallelism: int | None = Field(None, ge=1, description="at most this many array tasks at once")
    max_requeues: int = Field(
        3, ge=0, description="requeues allowed after hitting the time limit (preemptions do not count)"
    )
    signal: str = Field("USR2", description=f"signal sent before the time limit: {' or '.join(ALLOWED_SIGNALS)}")
    signal_lead_s: int = Field(
        120, ge=0, description="seconds before the limit to send it (SLURM may send it up to 60 s early)"
    )

    def problems(self) -> list[str]:
        if signal_name(self) not in ALLOWED_SIGNALS:
            return [
                f"signal: {self.signal!r} is not allowed, use one of {', '.join(ALLOWED_SIGNALS)} "
                "(USR1 can be swallowed by NCCL; TERM/USR1 are the training's own stop signals)"
            ]
        return []

    @property
    def ntasks_per_node(self) -> int:
        if self.tasks_per_node is not None:
            return self.tasks_per_node
        return self.gpus_per_node if self.gpus_per_node > 0 else 1


FIELDS = ClusterOptions.model_fields


def merge(base: ClusterOptions, overrides: dict[str, Any], source: str) -> ClusterOptions:
    """A copy of `base` with `overrides` applied; each mistake (an unknown key with a did-you-mean, a wrong
    type or value) is named with `source` in one line."""
    return ClusterOptions.with_sources({**base.model_dump(), **overrides}, {key: source for key in overrides})


def load_json(path: str | Path, base: ClusterOptions | None = None) -> ClusterOptions:
    """Options from a JSON object of {option: value}, on top of `base` (the stage's defaults)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise OptionsError(f"cannot read cluster config {path}: {e}") from None
    if not isinstance(data, dict):
        raise OptionsError(f"cluster config {path}: expected a JSON object of option: value")
    return merge(base or ClusterOptions(), data, f"in cluster config {path}")


def signal_name(opts: ClusterOptions) -> str:
    return opts.signal.upper().removeprefix("SIG")


def executor_kwargs(opts: ClusterOptions, stage: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(constructor kwargs, update_parameters kwargs) of `submitit.AutoExecutor` for these options.

    `slurm_max_num_timeout` only works in the constructor (update_parameters rejects it).
    """
    from submitit.core.job_environment import JobEnvironment

    ctor: dict[str, Any] = {"folder": opts.job_folder, "slurm_max_num_timeout": opts.max_requeues}
    params: dict[str, Any] = {
        "name": opts.job_name or stage,
        "timeout_min": opts.time_min,
        "nodes": opts.nodes,
        "tasks_per_node": opts.ntasks_per_node,
        "slurm_signal_delay_s": opts.signal_lead_s,
    }
    if opts.gpus_per_node:
        params["gpus_per_node"] = opts.gpus_per_node
    if opts.cpus_per_task is not None:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb is not None:
        params["mem_gb"] = opts.mem_gb
    for name in ("partition", "account", "qos", "constraint", "array_parallelism"):
        if getattr(opts, name) is not None:
            params[f"slurm_{name}"] = getattr(opts, name)
    if opts.exclusive:
        params["slurm_exclusive"] = True
    sbatch, setup = dict(opts.sbatch_args), list(opts.setup)
    # submitit writes `--signal=<USR_SIG>@lead` and binds USR_SIG in the job, USR_SIG being read from
    # SUBMITIT_PREEMPT_SIGNAL at import. For another signal set both sides: the #SBATCH line here, and
    # the variable the job's submitit reads (exported before srun starts the tasks).
    sig = signal_name(opts)
    if sig != JobEnvironment.USR_SIG:
        sbatch.setdefault("signal", f"{sig}@{opts.signal_lead_s}")
        setup.insert(0, f"export SUBMITIT_PREEMPT_SIGNAL={sig}")
    if sbatch:
        params["slurm_additional_parameters"] = sbatch
    if opts.srun_args:
        params["slurm_srun_args"] = list(opts.srun_args)
    if setup:
        params["slurm_setup"] = setup
    return ctor, params
