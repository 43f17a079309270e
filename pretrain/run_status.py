"""run_status.json: what a launcher, a scheduler or a person reads about a run, true at every moment.

    {"status": "running" | "completed" | "stopped" | "failed" | "killed" | "stalled" | "diverged",
     "step": the last finished step, "total_steps": N, "checkpoint": the newest complete checkpoint (or null),
     "signal": the stop signal (or null), "reason": why it failed (failures only),
     "restarts": how many times this run was resumed, "last_fault": the reason of the last failure (or null),
     "faults_in_a_row": attempts in a row that ended in a fault (any kind, a death without a word included)
     without a new checkpoint, "resumed_from": the checkpoint this attempt started from, "updated_at": unix time}

Rank 0 rewrites it (temp file, then rename) at the start, at every log line, at every checkpoint and at the
end; a failure is written by the rank that can say what happened. "running" after the process is gone
means it died without a word (SIGKILL, out of memory). Restarts, the last fault and the faults in a row are
carried over from the file as the attempt found it, also before the run's first checkpoint.

An automatic restart (torchrun's, or a SLURM requeue) that finds more faults in a row than
train.max_requeues_without_progress refuses to train (`check_progress`, exit code 5): a deterministic crash
does not loop for ever. A person's relaunch (a new torchrun, a new job) starts the count again.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from data_pipeline.errors import DataPipelineError

RUN_STATUS_FILE = "run_status.json"
FAULTS = ("failed", "killed", "stalled", "diverged")


class NoProgressError(RuntimeError):
    """An automatic restart after too many faults in a row without a new checkpoint; the message is one line."""


def automatic_restart(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a launcher started this attempt again on its own: torchrun after a failed attempt, or SLURM
    after a requeue (`scontrol requeue`, a node failure, a preemption)."""
    return any(int(environ.get(name) or 0) > 0 for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def read_run_status(run_dir: Path) -> dict[str, Any]:
    """The run's last status ({} when there is none or it cannot be read)."""
    try:
        return dict(json.loads((run_dir / RUN_STATUS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


def previous_fault(previous: dict[str, Any]) -> str | None:
    """The last fault the file as found tells of: its own failure, a process that died without a word (the
    file still says "running": SIGKILL, out of memory), or the fault it carried over."""
    status = previous.get("status")
    if status in FAULTS:
        return str(previous.get("reason") or status)
    if status == "running":
        return f"the previous attempt ended without a word after step {previous.get('step')} (SIGKILL? out of memory?)"
    return previous.get("last_fault")


def faults_so_far(previous: dict[str, Any]) -> int:
    """Faults in a row the file as found counts, with a death without a word after it (the file still says
    "running") as one more when that attempt made no new checkpoint."""
    count = int(previous.get("faults_in_a_row", 0))
    if previous.get("status") == "running":
        progressed = previous.get("checkpoint") != previous.get("resumed_from")
        return 1 if progressed else count + 1
    return count


class RunStatus:
    """The run's status file. `step` and `checkpoint` follow the run in memory; `write` puts them on disk."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        step: int,
        checkpoint: Path | None,
        previous: dict[str, Any],
        resumed: bool = False,
    ) -> None:
        """previous: the file as the run found it (read once, by rank 0, before anyone writes it).
        resumed: whether this run continues the previous one (--resume auto or a path), which it also does
        before the run's first checkpoint exists."""
        self.run_dir, self.total_steps = run_dir, total_steps
        self.step, self.checkpoint = step, str(checkpoint) if checkpoint else None
        carried = bool(checkpoint) or (bool(resumed) and bool(previous))
        self.restarts = int(previous.get("restarts", 0)) + 1 if carried else 0
        self.last_fault = previous_fault(previous) if carried else None
        self.resumed_checkpoint = self.checkpoint
        self.faults_before = faults_so_far(previous) if carried and automatic_restart() else 0

    def faults_in_a_row(self) -> int:
        """The count if the run faulted now: one more than before, unless it checkpointed since it started."""
        return (self.faults_before if self.checkpoint == self.resumed_checkpoint else 0) + 1

    def check_progress(self, cap: int) -> None:
        """Every rank, at the start: NoProgressError when this automatic restart follows more than `cap` faults
        in a row without a new checkpoint (rank 0 records it)."""
        if self.faults_before <= cap:
            return
        line = (
            f"not training: {self.faults_before} attempts in a row ended in a fault without a new checkpoint "
            f"(the last: {self.last_fault}), more than train.max_requeues_without_progress ({cap}); find the "
            "cause, then relaunch with --resume auto"
        )
        raise NoProgressError(line)

    def write(self, status: str, signal: str | None = None, reason: str | None = None) -> None:
        values: dict[str, Any] = {
            "status": status,
            "step": self.step,
            "total_steps": self.total_steps,
            "checkpoint": self.checkpoint,
            "signal": signal,
            "restarts": self.restarts,
            "last_fault": reason if status in FAULTS else self.last_fault,
            "faults_in_a_row": self.faults_in_a_row()
            if status in FAULTS
            else (self.faults_before if self.checkpoint == self.resumed_checkpoint else 0),
            "resumed_from": self.resumed_checkpoint,
            "updated_at": time.time(),
        }
        if reason is not None:
            values["reason"] = reason
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.run_dir / RUN_STATUS_FILE, values)

    def record_failure(self, err: BaseException, signal_name: str | None) -> None:
        """ "killed" (a signal came first) or "failed", with the reason, if the disk still takes it. A
        corrupt-shard record written by the rank that found it is not overwritten by rank 0's consequence."""
        lines = str(err).strip().splitlines()
        text = lines[-1] if len(lines) > 1 and "DataLoader worker" in lines[0] else (lines[0] if lines else "")
        reason = f"{type(err).__name__}: {text.removeprefix('data_pipeline.errors.DataPipelineError: ')}"[:500]
        if not isinstance(err, DataPipelineError):
            time.sleep(1.0)  # let a rank that found a corrupt shard write first
            previous = read_run_status(self.run_dir)
            if previous.get("status") == "failed" and "DataPipelineError" in str(previous.get("reason")):
                return
        try:
            self.write(
                "killed" if signal_name else "failed", reason=f"{signal_name}; then {reason}" if signal_name else reason
            )
        except OSError:
            pass
