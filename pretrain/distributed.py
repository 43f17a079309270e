"""The world process group, also for workers that torchrun (torchelastic) restarts.

torchrun's agent hosts the job's TCPStore and, since torch 2.5, keeps that one store for the whole job:
every restart of the workers connects to the same MASTER_PORT, and the keys the previous attempt wrote are
still there. The new ranks then read each other's addresses as the dead ranks published them (gloo:
"connectFullMesh failed ... Connection refused" within a second or two; NCCL: a stale unique id), and
store-based barriers and the stall watchdog's heartbeats count entries from the attempt before. So each
attempt gets a key space of its own on that store, named by TORCHELASTIC_RESTART_COUNT, which all the
workers of one agent share.

Several agents (torchrun on several nodes) do not share their restart counts (an agent counts only its own
workers' failures), so no worker-side name can tell attempts apart there; launch those with
TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, which makes torchrun start a fresh store for every attempt.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from datetime import timedelta

SHARED_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


def attempt_prefix(environ: Mapping[str, str] = os.environ) -> str | None:
    """The store key prefix of this worker's attempt, or None where the store is new for every attempt
    (no torchrun, or torchrun with its store sharing off) or where agents disagree on the count."""
    if environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        return None
    return f"torchrun-attempt-{int(environ.get('TORCHELASTIC_RESTART_COUNT', '0'))}/"


def multi_node_restart_warning(environ: Mapping[str, str] = os.environ) -> str | None:
    """One line for a torchrun job on several nodes whose restarts would meet the previous attempt's keys."""
    if (
        environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        and int(environ.get("GROUP_WORLD_SIZE", "1")) > 1
        and int(environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    ):
        return (
            "pretrain: torchrun keeps one store across restarts on several nodes, and a restart would read the "
            f"previous attempt's addresses; launch with {SHARED_STORE_FIX} for --max-restarts to work"
        )
    return None


def init_distributed(timeout: timedelta) -> None:
    """deepspeed.init_distributed(timeout=...) over env://, the world group in this attempt's own key space."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    warning = multi_node_restart_warning()
    if warning and os.environ.get("RANK") == "0":
        print(warning, file=sys.stderr, flush=True)
    prefix = attempt_prefix()
    if prefix is not None and not dist.is_initialized():
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        accelerator = get_accelerator()
        device = {}
        if accelerator.device_name() == "cuda" and world_size > 1:  # as deepspeed.init_distributed binds it
            device = {"device_id": torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))}
        dist.init_process_group(
            accelerator.communication_backend_name(),
            store=dist.PrefixStore(prefix, store),
            rank=rank,
            world_size=world_size,
            timeout=timeout,
            **device,
        )
    deepspeed.init_distributed(timeout=timeout)  # adopts a group made above
