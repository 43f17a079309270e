"""metrics.sample_ids: every step's training sequences, all ranks, in `<run>/sample_ids.jsonl` (an audit of
the data order: `python -m pretrain.sample_audit`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist

from pretrain.data import TrainBatches

SAMPLE_IDS_FILE = "sample_ids.jsonl"


def write_sample_ids(run_dir: Path, step: int, batches: TrainBatches, rank: int, world_size: int) -> None:
    """Collective: rank 0 appends one line, the step's micro-batches of every rank in the global order
    (micro-step j of rank r is global micro-batch j x world size + r), as [shard, index] rows; dropped
    (non-finite) micro-batches included."""
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
