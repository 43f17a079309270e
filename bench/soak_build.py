"""`data_pipeline build` under a stream of SIGKILLs: resumed after each, it ends byte-identical to a build
that was never interrupted, and no process of a killed attempt lives on.

    python -m bench.soak_build                      # the IMDB corpus (../shared/data/corpus/imdb), 10 kills
    python -m bench.soak_build --kills 3 INPUT ...  # any corpus data_pipeline reads

1. The reference: one uninterrupted build, timed. Its timeline (tokenizer and plan written, each unit's
   done-marker, the manifest) is read from those files' modification times.
2. The soak: the same command in the same folder, started again after every kill. The kill moments are
   drawn (seeded) over the reference's timeline; an attempt that resumes where the reference stood at time D
   is killed `moment - D` seconds after it starts, so the kills land in every phase, not only the first.
   Kills alternate between the whole process group (what a scheduler does) and the driver process alone
   (what the OOM killer does: its workers must then end by themselves). After each kill every process of
   the attempt must be gone within ORPHAN_GRACE_S. After the last kill the command runs to the end.
3. The comparison: every file of the two builds byte for byte (shards, tokenizer, config), except
   manifest.json, whose `report` holds the build's measured times: it must be identical without them.

Per kill the results say when it came, the phase it hit, what the next attempt redid (the tokenizer, or the
units that were in progress: a unit is redone from its start) and the seconds lost: the attempt's time after
its last durable step (the plan or a unit's done-marker), which the next attempt spends again.
Writes <out>/results.json; `python -m bench.report` puts it into docs/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from common.files import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
IMDB = ROOT.parent / "shared" / "data" / "corpus" / "imdb"
DEFAULT_INPUTS = [str(IMDB / "*.jsonl.gz")]
DEFAULT_OUT = ROOT / "bench" / "results" / "soak_build"
ORPHAN_GRACE_S = 10.0  # a worker whose driver died notices within data_pipeline.orphans.POLL_S
REPORT_TIMES = ("wall_seconds", "unit_seconds", "tokens_per_second", "tokens_per_second_per_process")
FIRST_MOMENT, LAST_MOMENT = 0.03, 0.8  # kills fall within this part of the reference's duration


class SoakError(SystemExit):
    def __init__(self, message: str) -> None:
        super().__init__(f"bench.soak_build: {message}")


@dataclass
class Timeline:
    """When (seconds after the build started) each durable step of a build folder was written."""

    plan_s: float | None
    units_s: dict[str, float]
    manifest_s: float | None

    @classmethod
    def read(cls, out: Path, started: float) -> Timeline:
        work = out / "_work"
        plan = work / "plan.json"
        manifest = out / "manifest.json"
        return cls(
            plan_s=plan.stat().st_mtime - started if plan.is_file() else None,
            units_s={p.stem: p.stat().st_mtime - started for p in sorted((work / "units").glob("*.json"))},
            manifest_s=manifest.stat().st_mtime - started if manifest.is_file() else None,
        )


@dataclass
class Kill:
    number: int
    mode: str  # "group" or "driver"
    moment_s: float  # where on the reference's timeline the kill was meant to land
    at_s: float = 0.0  # seconds after the attempt started
    phase: str = ""
    units_done: int = 0
    redone: list[str] = field(default_factory=list)
    lost_s: float = 0.0
    orphans: list[str] = field(default_factory=list)
    gone_after_s: float = 0.0


def build_command(inputs: list[str], out: Path, options: list[str], workers: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "data_pipeline",
        "build",
        *inputs,
        "--out",
        str(out),
        "--workers",
        str(workers),
        "--no-progress",
        *options,
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log, "ab") as sink:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def run_to_end(command: list[str], log: Path, timeout_s: float) -> float:
    began = time.monotonic()
    proc = start(command, log)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_tree(proc, "group")
        raise SoakError(f"the build did not finish within {timeout_s:.0f}s (log: {log})") from None
    if rc != 0:
        raise SoakError(f"the build failed with exit code {rc}: {tail(log)}")
    return time.monotonic() - began


def tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:])


def descendants(proc: subprocess.Popen) -> list[psutil.Process]:
    with contextlib.suppress(psutil.NoSuchProcess):
        root = psutil.Process(proc.pid)
        return [root, *root.children(recursive=True)]
    return []


def kill_tree(proc: subprocess.Popen, mode: str) -> list[psutil.Process]:
    """SIGKILL the attempt (its process group, or its driver alone); return what was alive just before."""
    alive = descendants(proc)
    if mode == "group":
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    else:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    return alive


def session_members(session: int) -> list[psutil.Process]:
    members = []
    for pid in psutil.pids():
        with contextlib.suppress(ProcessLookupError, PermissionError, psutil.NoSuchProcess):
            if os.getsid(pid) == session:
                members.append(psutil.Process(pid))
    return members


def wait_for_orphans(before: list[psutil.Process], session: int) -> tuple[list[str], float]:
    """Processes of the killed attempt still running after ORPHAN_GRACE_S (pid and command line), and how
    long the last of them took to go. A zombie waiting for its parent to read it counts as gone."""
    began = time.monotonic()
    while True:
        left = {p.pid: p for p in [*before, *session_members(session)] if running(p)}
        if not left or time.monotonic() - began > ORPHAN_GRACE_S:
            break
        time.sleep(0.1)
    described = []
    for p in left.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            described.append(f"{p.pid} {' '.join(p.cmdline())[:200]}")
    return described, time.monotonic() - began


def running(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


def unit_files(out: Path) -> set[str]:
    """Units with a shard (finished or being written) in the folder."""
    return {p.name.split("-", 1)[0] for split in ("train", "validation") for p in (out / split).glob("*.tar*")}


def durable_position(out: Path, reference: Timeline) -> float:
    """Where on the reference's timeline this folder's durable steps put a resumed build."""
    done = Timeline.read(out, 0.0)
    marks = [reference.units_s[name] for name in done.units_s if name in reference.units_s]
    if done.plan_s is not None and reference.plan_s is not None:
        marks.append(reference.plan_s)
    return max(marks, default=0.0)


def draw_kills(count: int, seed: int, duration_s: float) -> list[Kill]:
    rng = random.Random(seed)
    moments = sorted(rng.uniform(FIRST_MOMENT, LAST_MOMENT) * duration_s for _ in range(count))
    first_mode = rng.choice(("group", "driver"))
    other = "driver" if first_mode == "group" else "group"
    return [Kill(i + 1, first_mode if i % 2 == 0 else other, round(m, 3)) for i, m in enumerate(moments)]


def attempt(kill: Kill, command: list[str], out: Path, log: Path, reference: Timeline, min_gap_s: float) -> bool:
    """One attempt, SIGKILLed at its moment; False when it finished first (the kill never came)."""
    position = durable_position(out, reference)
    gap = max(min_gap_s, kill.moment_s - position)
    kept = Timeline.read(out, 0.0)  # what earlier attempts made durable: rewriting it is no progress
    began_wall, began = time.time(), time.monotonic()
    proc = start(command, log)
    try:
        proc.wait(timeout=gap)
        return False
    except subprocess.TimeoutExpired:
        pass
    before = kill_tree(proc, kill.mode)
    kill.at_s = round(time.monotonic() - began, 3)
    kill.orphans, gone = wait_for_orphans(before, proc.pid)
    kill.gone_after_s = round(gone, 1)  # polled every 0.1 s
    after = Timeline.read(out, began_wall)
    kill.units_done = len(after.units_s)
    if after.plan_s is None:
        kill.phase, kill.redone = "tokenizer", ["tokenizer"]
    elif after.manifest_s is None and len(after.units_s) < len(reference.units_s):
        kill.phase = "units"
        kill.redone = sorted(unit_files(out) - set(after.units_s))
    else:
        kill.phase = "finalize"
        kill.redone = ["manifest"] if after.manifest_s is None else []
    written = [s for name, s in after.units_s.items() if name not in kept.units_s]
    written += [s for s in (after.plan_s if kept.plan_s is None else None, after.manifest_s) if s is not None]
    kill.lost_s = round(kill.at_s - max(written, default=0.0), 3)
    return True


def compare(reference: Path, soaked: Path) -> dict[str, Any]:
    """Byte comparison of every file outside _work/; manifest.json without its measured times."""

    def files(root: Path) -> set[str]:
        return {
            str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] != "_work"
        }

    ours, theirs = files(reference), files(soaked)
    differing = sorted(
        name
        for name in ours & theirs
        if name != "manifest.json" and not filecmp.cmp(reference / name, soaked / name, shallow=False)
    )

    def manifest(root: Path) -> dict[str, Any]:
        data = json.loads((root / "manifest.json").read_text())
        for key in REPORT_TIMES:
            data["report"].pop(key, None)
        return data

    manifest_same = manifest(reference) == manifest(soaked)
    if not manifest_same:
        differing.append("manifest.json")
    return {
        "files": len(ours),
        "bytes": sum((reference / name).stat().st_size for name in ours),
        "shards": sum(1 for name in ours if name.endswith(".tar")),
        "missing": sorted(ours - theirs),
        "extra": sorted(theirs - ours),
        "differing": differing,
        "manifest_times_set_aside": list(REPORT_TIMES),
        "identical": not differing and ours == theirs,
    }


def soak(
    inputs: list[str],
    work: Path,
    options: list[str],
    kills: int = 10,
    seed: int = 0,
    workers: int = 2,
    min_gap_s: float = 1.0,
    timeout_s: float = 3600.0,
) -> dict[str, Any]:
    """The reference build, the killed-and-resumed build, and their comparison (see the module docstring)."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    build_dir, reference_dir, log = work / "build", work / "reference", work / "build.log"
    command = build_command(inputs, build_dir, options, workers)

    began = time.time()
    reference_s = run_to_end(command, log, timeout_s)
    timeline = Timeline.read(build_dir, began)
    build_dir.rename(reference_dir)  # the soak builds in the same folder: config.json names it

    schedule = draw_kills(kills, seed, reference_s)
    soak_began = time.monotonic()
    done: list[Kill] = []
    for kill in schedule:
        if not attempt(kill, command, build_dir, log, timeline, min_gap_s):
            break  # the build finished before this kill: the rest cannot come
        done.append(kill)
        print(
            f"kill {kill.number}/{kills} ({kill.mode}) at {kill.at_s:.1f}s into the attempt: {kill.phase}, "
            f"redo {', '.join(kill.redone) or 'nothing begun'}, {kill.lost_s:.1f}s lost, "
            f"{len(kill.orphans)} process(es) left after {kill.gone_after_s:.2f}s",
            flush=True,
        )
    final_s = run_to_end(command, log, timeout_s)
    soak_s = time.monotonic() - soak_began
    comparison = compare(reference_dir, build_dir)
    manifest = json.loads((reference_dir / "manifest.json").read_text())
    plan = json.loads((reference_dir / "_work" / "plan.json").read_text())
    orphans = [o for k in done for o in k.orphans]
    return {
        "inputs": inputs,
        "corpus_bytes": sum(u["est_bytes"] for u in plan["units"]),
        "units": len(plan["units"]),
        "tokens": manifest["report"]["tokens_written"],
        "build_options": options,
        "workers": workers,
        "seed": seed,
        "kills_requested": kills,
        "kills_survived": len(done),
        "identical": comparison["identical"],
        "orphans_left": len(orphans),
        "reference_wall_s": round(reference_s, 3),
        "reference_tokenizer_s": round(timeline.plan_s or 0.0, 3),
        "soak_wall_s": round(soak_s, 3),
        "overhead_s": round(soak_s - reference_s, 3),
        "lost_s_total": round(sum(k.lost_s for k in done), 3),
        "lost_s_max": round(max((k.lost_s for k in done), default=0.0), 3),
        "final_attempt_s": round(final_s, 3),
        "files_compared": comparison["files"],
        "shards_compared": comparison["shards"],
        "bytes_compared": comparison["bytes"],
        "differing": comparison["differing"] + comparison["missing"] + comparison["extra"],
        "manifest_times_set_aside": comparison["manifest_times_set_aside"],
        "reference_units": [{"unit": name, "done_at_s": round(s, 3)} for name, s in timeline.units_s.items()],
        "kills": [{**k.__dict__, "redone": ", ".join(k.redone) or "-", "orphans": len(k.orphans)} for k in done],
        "orphan_processes": orphans,
        "ok": comparison["identical"] and not orphans and len(done) == kills,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.soak_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("inputs", nargs="*", default=DEFAULT_INPUTS, help="the corpus (default: IMDB from ../shared)")
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--shard-mb", type=float, default=4.0)
    parser.add_argument("--unit-mb", type=float, default=256.0)
    parser.add_argument("--min-gap-s", type=float, default=1.0, help="shortest time an attempt runs before its kill")
    parser.add_argument("--work", type=Path, default=None, help="build folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results.json goes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for pattern in args.inputs:
        if not list(Path(pattern).parent.glob(Path(pattern).name)):
            raise SoakError(f"{pattern}: no such input (the IMDB corpus lives in ../shared/data/corpus/imdb)")
    options = [
        "--vocab-size",
        str(args.vocab_size),
        "--seq-len",
        str(args.seq_len),
        "--shard-mb",
        str(args.shard_mb),
        "--unit-mb",
        str(args.unit_mb),
    ]
    import tempfile

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak_build-")))
        result = soak(args.inputs, work, options, args.kills, args.seed, args.workers, args.min_gap_s)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": shlex.join(["python", "-m", "bench.soak_build", *given]), **result}
    result["inputs"] = [os.path.relpath(i, ROOT) for i in result["inputs"]]
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", result)
    print(
        f"{result['kills_survived']}/{args.kills} kills survived; build "
        f"{'byte-identical' if result['identical'] else 'DIFFERENT: ' + ', '.join(result['differing'][:5])} "
        f"({result['files_compared']} files, {result['shards_compared']} shards); {result['orphans_left']} orphan "
        f"process(es); {result['lost_s_total']:.1f}s lost in all, overhead {result['overhead_s']:.1f}s on a "
        f"{result['reference_wall_s']:.1f}s build"
    )
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
