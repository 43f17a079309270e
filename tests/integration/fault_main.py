"""`pretrain/main.py` with a fault injected, for the integration tests: the launcher runs this file in its place.

    PRETRAIN_FAULT=kill:RANK:STEP          SIGKILL (a crashed rank)
    PRETRAIN_FAULT=stop:RANK:STEP          SIGSTOP (a stalled rank: frozen, every thread included)
    PRETRAIN_FAULT=signal:RANK:STEP:NAME   send itself signal NAME (a scheduler's stop or preemption signal)

Rank RANK hurts itself right after finishing step STEP, through the trainer's `after_step` hooks. The spec is
parsed before anything starts; a malformed one ends the process with one line and exit 2.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(ROOT))

FAULT_ENV = "PRETRAIN_FAULT"
USAGE = "expected kill:RANK:STEP, stop:RANK:STEP or signal:RANK:STEP:NAME"


def parse_fault(spec: str) -> Callable[[int, int], None]:
    """The after-step hook `spec` describes; ValueError with one line when it is malformed."""
    kind, *fields = spec.split(":")
    want = 3 if kind == "signal" else 2
    if kind not in ("kill", "stop", "signal") or len(fields) != want or not all(f.isdigit() for f in fields[:2]):
        raise ValueError(f"{FAULT_ENV}={spec!r}: {USAGE}")
    fault_rank, fault_step = int(fields[0]), int(fields[1])
    if kind == "signal":
        name = fields[2] if fields[2].startswith("SIG") else f"SIG{fields[2]}"
        if name not in signal.Signals.__members__:
            raise ValueError(f"{FAULT_ENV}={spec!r}: no signal {fields[2]!r}")
        signum = signal.Signals[name]

    def hook(rank: int, step: int) -> None:
        if rank != fault_rank or step != fault_step:
            return
        if kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "stop":
            print(f"fault injection: rank {rank} SIGSTOPs itself after step {step} at {time.time():.3f}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            os.kill(os.getpid(), signum)

    return hook


if __name__ == "__main__":
    try:
        fault = parse_fault(os.environ.get(FAULT_ENV, ""))
    except ValueError as err:
        print(f"fault_main: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    from pretrain.main import main

    sys.exit(main(after_step=[fault]))
