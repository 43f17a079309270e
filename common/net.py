"""A free TCP port on this host, for single-node launches (torchrun/deepspeed rendezvous)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the OS just handed out and released. Another process may take it before the launch binds
    it; single-node launches accept that small race (the rendezvous then fails with a clear error)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
