"""`python -m data_pipeline` that SIGKILLs itself right after renaming its N-th shard (counted over all units,
so mid-unit), N from DATA_PIPELINE_TEST_KILL_AFTER_SHARDS: the kill-and-resume tests run this in its place.
The count is parsed before anything starts; a malformed one ends the process with one line and exit 2."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if not p or Path(p).resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CRASH_AFTER_SHARDS_ENV = "DATA_PIPELINE_TEST_KILL_AFTER_SHARDS"


def crash_after(n: int):
    done = 0

    def hook(_record: dict) -> None:
        nonlocal done
        done += 1
        if done >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


if __name__ == "__main__":
    text = os.environ.get(CRASH_AFTER_SHARDS_ENV, "")
    if not text.isdigit() or int(text) < 1:
        print(f"crashing_build: {CRASH_AFTER_SHARDS_ENV}={text!r}: expected a whole number >= 1", file=sys.stderr)
        sys.exit(2)
    from data_pipeline.__main__ import main
    from data_pipeline.build import SHARD_DONE_HOOKS

    SHARD_DONE_HOOKS.append(crash_after(int(text)))
    sys.exit(main(sys.argv[1:]))
