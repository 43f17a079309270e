"""The one fault hook in pretraining, for the integration tests (tests/integration): with PRETRAIN_FAULT set,
rank RANK hurts itself right after finishing step STEP. Never set in real runs; unset, it costs one
environment lookup per step.

    kill:RANK:STEP          SIGKILL (a crashed rank)
    stop:RANK:STEP          SIGSTOP (a stalled rank: frozen, every thread included, until SIGCONT or SIGKILL)
    signal:RANK:STEP:NAME   send itself signal NAME (a scheduler's stop or preemption signal)
"""

from __future__ import annotations

import os
import signal
import time

FAULT_ENV = "PRETRAIN_FAULT"


def inject_fault(rank: int, step: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    kind, fault_rank, fault_step, *rest = spec.split(":")
    if int(fault_rank) != rank or int(fault_step) != step:
        return
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif kind == "stop":
        print(f"fault injection: rank {rank} SIGSTOPs itself after step {step} at {time.time():.3f}", flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
    elif kind == "signal":
        os.kill(os.getpid(), signal.Signals[rest[0] if rest[0].startswith("SIG") else f"SIG{rest[0]}"])
