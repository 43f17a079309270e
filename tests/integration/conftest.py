"""The `slurm_cluster` fixture: a real single-machine SLURM cluster (slurm/local_cluster.sh),
started once per test session, reused when one is already up, and stopped at the end by the last
pytest session using it, if a pytest session started it. Tests that need it are skipped, with the
script's own error, where it cannot start (not root, no apt, busy ports)."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "local_cluster.sh"
START_TIMEOUT_S = 900  # a fresh machine runs apt-get update + install first
_summary: list[str] = []


@dataclass
class LocalCluster:
    conf: str  # the SLURM_CONF clients need
    sandbox: Path
    started_here: bool
    start_s: float


def _sandbox() -> Path:
    return Path(os.environ.get("SLURM_SANDBOX") or Path(os.environ.get("TMPDIR", "/tmp")) / "hypermixer-slurm")


def _script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def _conf_from(stdout: str) -> str | None:
    for line in stdout.splitlines():
        if line.startswith("export SLURM_CONF="):
            return line.split("=", 1)[1].strip()
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _live_leases(leases: Path) -> list[Path]:
    return [p for p in leases.glob("*") if p.name.isdigit() and _pid_alive(int(p.name))]


@pytest.fixture(scope="session")
def slurm_cluster():
    sandbox = _sandbox()
    t0 = time.monotonic()
    try:
        status = _script("status", timeout=60)
        started_here = status.returncode != 0
        proc = _script("start", timeout=START_TIMEOUT_S) if started_here else status
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"local SLURM cluster unavailable: {type(e).__name__}: {e}")
    conf = _conf_from(proc.stdout)
    if proc.returncode != 0 or conf is None:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        pytest.skip(f"local SLURM cluster could not start ({SCRIPT.name} rc={proc.returncode}):\n{tail}")
    start_s = time.monotonic() - t0
    notes = [line for line in proc.stderr.splitlines() if "installed in" in line or "cluster up" in line]
    _summary.append(
        ("started" if started_here else "reused") + f" in {start_s:.1f}s" + ("".join(f"\n  {n}" for n in notes))
    )

    # Leases: another pytest session on this machine may be using the same cluster; the last one out stops
    # it, and only when a pytest session started it (a cluster someone started by hand stays up).
    leases = sandbox / "leases"
    leases.mkdir(exist_ok=True)
    lease = leases / str(os.getpid())
    lease.touch()
    if started_here:
        (sandbox / ".started-by-pytest").touch()

    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = conf
    try:
        yield LocalCluster(conf=conf, sandbox=sandbox, started_here=started_here, start_s=start_s)
    finally:
        lease.unlink(missing_ok=True)
        if previous is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = previous
        if (sandbox / ".started-by-pytest").exists() and not _live_leases(leases):
            t1 = time.monotonic()
            stop = _script("stop", timeout=120)
            _summary.append(f"stopped in {time.monotonic() - t1:.1f}s (rc={stop.returncode})")


@pytest.fixture(scope="session")
def slurm_report():
    """`slurm_report("line")` adds a measured figure to the "local SLURM cluster" section of the summary."""
    return _summary.append


def pytest_terminal_summary(terminalreporter):
    if _summary:
        terminalreporter.write_sep("-", "local SLURM cluster")
        for line in _summary:
            terminalreporter.write_line(line)
