"""The stalled-rank watchdog: a job where some rank stopped making progress ends in minutes, not hours.

One setting, `train.stall_timeout_s`, bounds both halves:

1. Every process group gets it as its timeout: `deepspeed.init_distributed(timeout=...)` for the world
   group, and torch's default for groups created later without one (DeepSpeed's data-parallel and
   ZeRO groups call `dist.new_group(ranks)` without a timeout and would otherwise wait 30 minutes).
2. A progress watchdog. The training loop calls `progress(step)` after each step, evaluation and
   checkpoint. A daemon thread on every rank publishes (step, host, pid, wall time) in the job's
   rendezvous store every few seconds and checks its own rank: when the loop made no progress for
   `stall_timeout_s` (every rank waiting on a stalled peer is in that state at about the same time), it
   reads the other ranks' heartbeats, names the stalled rank(s) (the ones whose heartbeat stopped, or
   failing that the ones furthest behind) with their last finished step, and exits the process with
   EXIT_STALLED. The lowest live rank prints the one line and writes run_status.json "stalled"; the
   others exit silently. A stalled rank on the reporter's own host is SIGKILLed by it (a stopped process
   ignores the launcher's SIGTERM for its whole grace period); on other hosts the launcher ends it.

EXIT_STALLED is requeue-able: the checkpoints written before the stall are complete, `--resume auto`
continues from the newest one, and the SLURM launcher requeues the job on it (slurm/launchers/pretrain.py).
A collective that times out (the process-group half firing first) is turned into the same exit by
`Watchdog.check_error`: an error of the type a collective raises (RuntimeError, which torch.distributed's
errors subclass, or TimeoutError) after the loop made no progress for `stall_timeout_s`, which is every
group's timeout; the message text is not read.

A stall after faults in a row (of any kind) without a new checkpoint in between is counted with them
(run_status.json "faults_in_a_row"); past `train.max_requeues_without_progress` in a row it exits with
EXIT_STALLED_AGAIN instead, which no launcher requeues, and the stall hooks (the requeue) are not run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

EXIT_STALLED = 75  # EX_TEMPFAIL: "try again later"; the SLURM launcher requeues on it
EXIT_STALLED_AGAIN = 5  # faulted again with no progress since the last restart: needs a person, not a requeue
# The types a timed-out collective raises: gloo a RuntimeError, NCCL and the stores torch.distributed's DistError
# (a RuntimeError); a store read a TimeoutError.
COLLECTIVE_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, TimeoutError)
KEY_PREFIX = "pretrain-watchdog/"
# Called with the stall line by the reporting rank before it exits (the SLURM launcher adds its requeue).
STALL_HOOKS: list[Callable[[str], None]] = []


def set_default_group_timeout(seconds: float) -> timedelta:
    """Give every process group created from now on (without an explicit timeout) `seconds`."""
    from torch.distributed import distributed_c10d

    timeout = timedelta(seconds=seconds)
    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout
    return timeout


def group_timeouts() -> dict[str, float]:
    """Timeout in seconds of every live process group (for tests and diagnostics)."""
    import torch
    from torch.distributed import distributed_c10d

    out: dict[str, float] = {}
    for group, name in distributed_c10d._world.pg_names.items():
        try:
            backend = group._get_backend(torch.device("cpu"))
        except RuntimeError:
            backend = group._get_backend(torch.device("cuda"))
        out[name] = backend.options._timeout.total_seconds()
    return out


def _exit_now(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(code)


class Watchdog:
    """See the module docstring. `on_stall(line)` runs in the reporting rank before it exits (writes
    run_status.json); `may_requeue()` says whether this stall may be requeued (False: EXIT_STALLED_AGAIN);
    `exit` is what ends the process (os._exit; tests may pass their own)."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        timeout_s: float,
        on_stall: Callable[[str], None] | None = None,
        exit: Callable[[int], None] = _exit_now,
        interval_s: float | None = None,
        may_requeue: Callable[[], bool] = lambda: True,
    ) -> None:
        self.rank, self.world_size, self.timeout_s = rank, world_size, float(timeout_s)
        self.interval_s = interval_s or max(0.2, min(5.0, self.timeout_s / 10))
        self.on_stall, self._exit, self.may_requeue = on_stall, exit, may_requeue
        self._store = store
        self._step = 0
        self._progress_at = time.monotonic()
        self._stop = threading.Event()
        self._fired = threading.Lock()
        self._lock = threading.Lock()  # one store connection, two threads
        self._host, self._pid = socket.gethostname(), os.getpid()
        self._thread = threading.Thread(target=self._run, name="pretrain-watchdog", daemon=True)

    @classmethod
    def for_default_group(cls, rank: int, world_size: int, timeout_s: float, **kwargs: Any) -> Watchdog:
        """A watchdog that talks through its own connection to the job's rendezvous store."""
        import torch.distributed as dist
        from torch.distributed import distributed_c10d

        store = distributed_c10d._get_default_store()
        try:
            store = store.clone()  # its own connection and timeout, so a stuck peer never blocks training's
            store.set_timeout(timedelta(seconds=max(5.0, min(30.0, timeout_s / 2))))
        except (AttributeError, RuntimeError):
            pass
        return cls(dist.PrefixStore(KEY_PREFIX, store), rank, world_size, timeout_s, **kwargs)

    # ------------------------------------------------------------------ the training loop's side

    def start(self, step: int) -> Watchdog:
        self.progress(step)
        self._thread.start()
        return self

    def progress(self, step: int) -> None:
        """The loop finished a step (or an evaluation or a checkpoint) and is at `step`. Publishes it at
        once (one small store write per step, none per micro-batch), so that a rank frozen right after a
        step is reported with that step."""
        self._progress_at = time.monotonic()
        if step == self._step and self._thread.is_alive():
            return  # the same step again (after an evaluation or a checkpoint): the thread's beats suffice
        self._step = step
        try:
            self._publish()
        except Exception:
            pass

    def stop(self) -> None:
        self._stop.set()

    def check_error(self, err: BaseException) -> None:
        """Called with an exception leaving the training loop: one of a collective's error types, raised after
        the loop waited the group timeout (`timeout_s`) without progress, is a collective that timed out: a stall."""
        idle = time.monotonic() - self._progress_at
        if isinstance(err, COLLECTIVE_ERRORS) and idle >= self.timeout_s:
            text = str(err).splitlines()[0][:200] if str(err) else ""
            self.fire(f"a collective timed out after {idle:.0f} s without progress ({type(err).__name__}: {text})")

    # ------------------------------------------------------------------ the thread

    def _publish(self) -> None:
        value = json.dumps(
            {
                "step": self._step,
                "host": self._host,
                "pid": self._pid,
                "time": time.time(),
                "idle_s": round(time.monotonic() - self._progress_at, 1),
            }
        )
        with self._lock:
            self._store.set(f"rank{self.rank}", value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            idle = time.monotonic() - self._progress_at
            if idle >= self.timeout_s:
                self.fire(f"no step for {idle:.0f} s")
                return
            try:
                self._publish()
            except Exception:
                pass

    def heartbeats(self) -> dict[int, dict[str, Any] | None]:
        """Every rank's last heartbeat (None: never published or unreadable)."""
        out: dict[int, dict[str, Any] | None] = {}
        for r in range(self.world_size):
            key = f"rank{r}"
            try:
                with self._lock:
                    out[r] = json.loads(self._store.get(key)) if self._store.check([key]) else None
            except Exception:
                out[r] = None
        return out

    def diagnose(self, reason: str) -> tuple[str, list[dict[str, Any]], bool]:
        """(what stalled, the heartbeats of the ranks that went silent, whether this rank is the lowest live one)."""
        now = time.time()
        beats: dict[int, dict[str, Any] | None] = {}
        reader = threading.Thread(target=lambda: beats.update(self.heartbeats()), daemon=True)
        reader.start()
        reader.join(timeout=max(5.0, min(30.0, self.timeout_s / 2)))
        if not beats:
            return (
                f"stalled: rank {self.rank} made no progress after step {self._step} ({reason}), and the "
                "rendezvous store did not answer (its host, rank 0's process or the launcher, may be the "
                "stalled one)",
                [],
                True,
            )
        beats[self.rank] = {"step": self._step, "host": self._host, "pid": self._pid, "time": now}
        silent_after = max(3 * self.interval_s, 2.0)
        dead = {r: b for r, b in beats.items() if b is None or now - b["time"] > silent_after}
        live = sorted(set(beats) - set(dead))
        if dead:
            what = "; ".join(
                f"rank {r} "
                + (
                    f"(last finished step {b['step']}, no heartbeat for "
                    f"{now - b['time']:.0f} s, pid {b['pid']} on {b['host']})"
                    if b
                    else "(never reported)"
                )
                for r, b in sorted(dead.items())
            )
        else:
            low = min(b["step"] for b in beats.values())
            stalled = {r: b for r, b in beats.items() if b["step"] == low}
            what = f"no rank made progress for {self.timeout_s:.0f} s; furthest behind: " + ", ".join(
                f"rank {r} (last finished step {b['step']})" for r, b in sorted(stalled.items())
            )
        return (
            f"stalled: {what}; {reason} on rank {self.rank}",
            [b for b in dead.values() if b],
            bool(live) and self.rank == live[0],
        )

    def fire(self, reason: str) -> None:
        if not self._fired.acquire(blocking=False):
            return
        self._stop.set()
        code = EXIT_STALLED
        try:
            line, silent, reporter = self.diagnose(reason)
            if self.may_requeue():
                line += f"; every rank exits with code {EXIT_STALLED} (requeue-able: resume with --resume auto)"
            else:
                code = EXIT_STALLED_AGAIN
                line += (
                    f"; one more fault without a new checkpoint since the last ones, more in a row than "
                    f"train.max_requeues_without_progress: every rank exits with code {EXIT_STALLED_AGAIN} (not "
                    "requeued: find the stalled rank's cause, then resume with --resume auto)"
                )
            if reporter:
                print(f"pretrain: {line}", file=sys.stderr, flush=True)
                hooks = STALL_HOOKS if code == EXIT_STALLED else []
                for hook in ([self.on_stall] if self.on_stall else []) + hooks:
                    try:
                        hook(line)
                    except Exception as err:
                        print(
                            f"pretrain: after the stall, {getattr(hook, '__name__', hook)} failed: {err}",
                            file=sys.stderr,
                            flush=True,
                        )
            for beat in silent:  # stopped processes on this host: the launcher's SIGTERM would wait on them
                if beat.get("host") == self._host and beat.get("pid") not in (None, self._pid):
                    try:
                        os.kill(int(beat["pid"]), signal.SIGKILL)
                    except (ProcessLookupError, PermissionError):
                        pass
        finally:
            self._exit(code)
