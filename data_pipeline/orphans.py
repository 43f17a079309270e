"""Worker processes that end with their parent: a SIGKILLed `python -m data_pipeline build` leaves no
spawned worker or manager process sleeping forever behind it.

Every child started by the build runs `die_with_parent()` first (a pool initializer, the manager's
initializer): a daemon thread that notices the parent is gone (the child was re-parented) and ends the
child at once. A thread rather than Linux's PR_SET_PDEATHSIG, which fires when the *thread* that
started the child ends (a pool may start children from a helper thread) and exists only on Linux.
"""

from __future__ import annotations

import os
import threading

POLL_S = 0.5


def die_with_parent(parent: int, poll_s: float = POLL_S) -> None:
    """`parent`: the pid of the process that started this one (passed in: by the time a child has imported
    what it needs, its parent may already be gone and os.getppid() would name its new parent)."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            threading.Event().wait(poll_s)

    threading.Thread(target=watch, name="die-with-parent", daemon=True).start()
