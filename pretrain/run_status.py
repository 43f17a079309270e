"""run_status.json: what a launcher, a scheduler or a person reads about a run, true at every moment.

    {"status": "running" | "completed" | "stopped" | "failed" | "killed" | "stalled" | "diverged",
     "step": the last finished step, "total_steps": N, "checkpoint": the newest complete checkpoint (or null),
     "signal": the stop signal (or null), "reason": why it failed (failures only),
     "restarts": how many times this run was resumed, "last_fault": the reason of the last failure (or null),
     "stalls_in_a_row": stalls with no new checkpoint between them, "updated_at": unix time}

Rank 0 rewrites it (temp file, then rename) at the start, at every log line, at every checkpoint and at the
end; a failure is written by the rank that can say what happened. "running" after the process is gone
means it died without a word (SIGKILL, out of memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from common.files import write_json_atomic
from data_pipeline.errors import DataPipelineError

RUN_STATUS_FILE = "run_status.json"
FAULTS = ("failed", "killed", "stalled", "diverged")


def read_run_status(run_dir: Path) -> dict[str, Any]:
    """The run's last status ({} when there is none or it cannot be read)."""
    try:
        return dict(json.loads((run_dir / RUN_STATUS_FILE).read_text()))
    except (OSError, ValueError, TypeError):
        return {}


class RunStatus:
    """The run's status file. `step` and `checkpoint` follow the run in memory; `write` puts them on disk."""

    def __init__(
        self, run_dir: Path, total_steps: int, step: int, checkpoint: Path | None, previous: dict[str, Any]
    ) -> None:
        """previous: the file as the run found it (read once, by rank 0, before anyone writes it)."""
        self.run_dir, self.total_steps = run_dir, total_steps
        self.step, self.checkpoint = step, str(checkpoint) if checkpoint else None
        self.restarts = int(previous.get("restarts", 0)) + 1 if checkpoint else 0
        fault = previous.get("reason") or previous.get("status")
        self.last_fault = (
            (fault if previous.get("status") in FAULTS else previous.get("last_fault")) if checkpoint else None
        )
        # A stall with no checkpoint newer than the one the stalled attempt resumed from counts as "in a row".
        same_place = previous.get("status") == "stalled" and previous.get("checkpoint") == self.checkpoint
        self.stalls_before = int(previous.get("stalls_in_a_row", 0)) if same_place else 0
        self.resumed_checkpoint = self.checkpoint

    def stalls_in_a_row(self) -> int:
        """The stall count if the run stalled now: one more than before, unless it checkpointed since."""
        return (self.stalls_before if self.checkpoint == self.resumed_checkpoint else 0) + 1

    def write(self, status: str, signal: str | None = None, reason: str | None = None) -> None:
        values: dict[str, Any] = {
            "status": status,
            "step": self.step,
            "total_steps": self.total_steps,
            "checkpoint": self.checkpoint,
            "signal": signal,
            "restarts": self.restarts,
            "last_fault": reason if status in FAULTS else self.last_fault,
            "stalls_in_a_row": self.stalls_in_a_row() if status == "stalled" else 0,
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
