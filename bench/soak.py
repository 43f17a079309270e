"""One pretraining run under a seeded stream of faults, restarted on its own: `python -m bench.soak`.

    python -m bench.soak                 # ZeRO-2 and ZeRO-3, 16 faults each (see --help for the sizes)
    python -m bench.soak --quick         # ZeRO-2, 10 faults, a small model (what the CI test runs)

1. The reference: the run, uninterrupted, under `torchrun --nproc_per_node 2`.
2. The soak: the same run under `torchrun --max-restarts N ... --resume auto`, with faults drawn (seeded) at
   steps of the run and sent from outside, by this driver, which watches run_status.json and the checkpoint
   folder: SIGKILL of a random rank (torchrun restarts the workers); SIGSTOP of a rank (its peer's stall
   watchdog ends the attempt with code 75, torchrun restarts it); a corrupt checkpoint (a file of the newest
   checkpoint truncated as soon as it is complete, then a rank SIGKILLed: the restart falls back to the
   previous complete checkpoint, in one line); and two SIGTERM preemptions of the whole job, each relaunched
   (as a SLURM requeue would be) on another world size: 2 ranks, then 1, then 2. No fault needs a person.
3. The comparison: the sample audit (every sample of the order exactly once, in order) and the final weights
   against the reference's: bitwise where the reduction order is the same, else the largest difference.
   The 1-rank part accumulates the same micro-batches in another order, so fp32 rounding differs there.

Per fault the results say the step it hit, the step the next attempt resumed from (`recomputed_steps`, the
steps done twice), and `lost_s`: the wall-clock from the fault until the run was back at the step it had
reached (the restart, the checkpoint load and the steps done again).
Writes <out>/results.json and results.md; `python -m bench.report` puts them into docs/results.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from common.files import write_json_atomic, write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "pretrain" / "main.py"
DEFAULT_OUT = ROOT / "bench" / "results" / "soak"
CORPUS = ROOT / "demo" / "data" / "corpus" / "wikitext-2-valid.txt"
POLL_S = 0.01
RESUMED = re.compile(r"^resuming from (\S+) \(step (\d+)\)", re.MULTILINE)
FELL_BACK = re.compile(r"^resume: \S+ is unreadable .*falling back to.*$", re.MULTILINE)


@dataclass(frozen=True)
class Size:
    """A soak's size: the model, the run and the faults."""

    model: tuple[str, ...]
    total_steps: int
    checkpoint_every: int
    faults: int
    stall_timeout_s: float
    stages: tuple[int, ...]


QUICK = Size(
    ("model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64"),
    total_steps=48,
    checkpoint_every=4,
    faults=10,
    stall_timeout_s=8.0,
    stages=(2,),
)
FULL = Size(
    ("model.hidden_size=128", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=256"),
    total_steps=360,  # WikiText-2's validation text is 336 steps an epoch: the audit sees a whole epoch
    checkpoint_every=20,
    faults=16,
    stall_timeout_s=20.0,
    stages=(2, 3),
)


def settings(data: str, run_dir: Path, size: Size, stage: int) -> list[str]:
    return [
        f"data.path={data}",
        f"output_dir={run_dir}",
        *size.model,
        "model.dropout=0.0",  # no dropout: the weights depend on the data order alone
        "model.attention_dropout=0.0",
        f"optim.total_steps={size.total_steps}",
        "optim.warmup_steps=2",
        "optim.lr=3e-3",
        "batch.global_batch_size=16",
        "batch.micro_batch_size=4",  # 2 accumulation steps on 2 ranks, 4 on 1
        "data.num_workers=1",
        "logging.every_steps=1",  # run_status.json is rewritten at every log line: the driver reads the step
        "eval.every_steps=0",
        f"checkpoint.every_steps={size.checkpoint_every}",
        "checkpoint.keep_last=2",  # the newest and the one a corrupt newest falls back to
        f"train.stall_timeout_s={size.stall_timeout_s}",
        # faults come every few steps here, often before the next checkpoint: no cap on those in a row
        f"train.max_requeues_without_progress={size.faults}",
        "metrics.sample_ids=true",
        "logging.wandb.mode=disabled",
        f"deepspeed.zero_optimization.stage={stage}",
    ]


@dataclass
class Fault:
    number: int
    kind: str  # "kill" | "stop" | "corrupt" | "preempt"
    at_step: int  # fires once the run has logged this step (or a later one)
    rank: int
    world_size: int  # of the attempt it hits
    fired_step: int = 0  # the last step the run had logged when it fired
    resumed_step: int = 0  # where the next attempt resumed
    recomputed_steps: int = 0
    restart_s: float = 0.0  # from the fault until the next attempt said which checkpoint it resumes from
    lost_s: float = 0.0  # from the fault until the run was back at fired_step
    detail: str = ""


def draw_faults(count: int, seed: int, size: Size) -> list[Fault]:
    """`count` faults at distinct random steps; two of them preemptions that change the world size to 1 and
    back to 2. On 1 rank a SIGSTOP has no peer to notice it (the process's own watchdog is frozen with it), so
    stops fall on 2-rank parts; a corrupt checkpoint needs a checkpoint after its step and one before."""
    if count < 4:
        raise SystemExit("bench.soak: at least 4 faults (a kill, a stop, a corrupt checkpoint, two preemptions)")
    rng = random.Random(seed)
    every, total = size.checkpoint_every, size.total_steps
    steps = sorted(rng.sample(range(every + 1, total - 1), count))
    first = rng.randrange(max(1, count // 5), max(2, count // 3) + 1)  # 2 ranks, then 1, then 2 again
    second = rng.randrange(first + 2, min(count - 1, first + 2 + count // 3))
    world = [2 if i <= first or i > second else 1 for i in range(count)]
    kinds = ["preempt" if i in (first, second) else "" for i in range(count)]
    corruptible = [i for i in range(count) if not kinds[i] and steps[i] <= total - 2 * every]
    two_rank = [i for i in range(count) if not kinds[i] and world[i] == 2 and i not in corruptible[:1]]
    kinds[rng.choice(corruptible)] = "corrupt"
    kinds[rng.choice([i for i in two_rank if not kinds[i]])] = "stop"
    for i in range(count):
        if not kinds[i]:
            options = ["kill", "stop", "corrupt"] if world[i] == 2 else ["kill", "corrupt"]
            kinds[i] = rng.choice([k for k in options if k != "corrupt" or i in corruptible])
    return [
        Fault(i + 1, kinds[i], steps[i], rng.randrange(world[i]), world[i] if kinds[i] != "preempt" else 2)
        for i in range(count)
    ]


# ---------------------------------------------------------------------------------------------- the job


def torchrun(run_dir: Path, data: str, size: Size, stage: int, nproc: int, max_restarts: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        str(MAIN),
        "--config",
        "tiny",
        "--set",
        *settings(data, run_dir, size, stage),
        "--resume",
        "auto",
    ]


def start(command: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".torch_extensions"))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    with open(log, "ab") as sink:
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill_job(proc: subprocess.Popen) -> None:
    """torchrun and every process under it (each rank runs in a session of its own, out of killpg's reach)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        launcher = psutil.Process(proc.pid)
        for process in [*launcher.children(recursive=True), launcher]:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
    proc.wait()


def rank_process(proc: subprocess.Popen, rank: int) -> psutil.Process | None:
    """The worker process of `rank` among torchrun's children (not its data-loader workers)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(proc.pid).children():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                if child.environ().get("RANK") == str(rank) and child.status() != psutil.STATUS_ZOMBIE:
                    return child
    return None


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((run_dir / "run_status.json").read_text()))
    except (OSError, ValueError):
        return {}


class Watch:
    """What the driver sees of a running job: run_status.json, the log's resume lines, the time."""

    def __init__(self, run_dir: Path, log: Path, deadline: float) -> None:
        self.run_dir, self.log, self.deadline = run_dir, log, deadline

    def resumes(self) -> list[int]:
        return [int(m.group(2)) for m in RESUMED.finditer(self.log.read_text(errors="replace"))]

    def wait(self, proc: subprocess.Popen, what: str, until: Any) -> Any:
        """Poll until `until()` returns something true (returned), or the job ends (None)."""
        while True:
            found = until()
            if found:
                return found
            if proc.poll() is not None:
                return None
            if time.monotonic() > self.deadline:
                kill_job(proc)
                tail = " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-5:])
                raise SystemExit(f"bench.soak: timed out waiting for {what}: {tail}")
            time.sleep(POLL_S)

    def step_reached(self, step: int, after_restarts: int) -> dict[str, Any] | None:
        """The status once an attempt newer than `after_restarts` restarts has logged `step` or later."""
        status = read_status(self.run_dir)
        fresh = status.get("status") in ("running", "completed") and int(status.get("restarts", 0)) > after_restarts
        return status if fresh and int(status.get("step", 0)) >= step else None


def newest_complete(root: Path, at_least: int) -> Path | None:
    from pretrain import checkpoint as ckpt

    """The newest checkpoint once its save has ended (`latest` names it), if it is at step `at_least` or later."""
    found = ckpt.latest_checkpoint(root)
    newest = [p for p in ckpt.checkpoint_folders(root) if ckpt.is_complete(p)][-1:]
    if found is None or newest != [found] or (ckpt.step_of(found) or 0) < at_least:
        return None  # none yet, or a save between its marker and `latest`
    return found


def inject(fault: Fault, proc: subprocess.Popen, run_dir: Path, watch: Watch, rng: random.Random) -> bool:
    """Send `fault` to the running job; False when the job ended before it could land."""
    if fault.kind == "preempt":
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on to every rank: a preemption
        fault.detail = "SIGTERM to torchrun"
        return True
    if fault.kind == "corrupt":
        newest = watch.wait(proc, "a checkpoint", lambda: newest_complete(run_dir / "checkpoints", fault.at_step))
        if newest is None:
            return False
        victim = rng.choice(sorted(p for p in newest.iterdir() if p.is_file()))
        size = victim.stat().st_size
        os.truncate(victim, size // 2)
        fault.detail = (
            f"{newest.name}/{victim.name} truncated to {size // 2} of {size} bytes, then rank {fault.rank} SIGKILLed"
        )
    process = rank_process(proc, fault.rank)
    if process is None:
        return False
    process.send_signal(signal.SIGSTOP if fault.kind == "stop" else signal.SIGKILL)
    fault.detail = fault.detail or f"rank {fault.rank} {'SIGSTOPped' if fault.kind == 'stop' else 'SIGKILLed'}"
    return True


def soak_run(
    data: str, work: Path, size: Size, stage: int, faults: list[Fault], seed: int, timeout_s: float
) -> dict[str, Any]:
    """The run under `faults` (see the module docstring); the faults are filled in with what they cost."""
    run_dir, rng = work / f"soak-zero{stage}", random.Random(seed + 1)
    began, deadline = time.monotonic(), time.monotonic() + timeout_s
    launches, nproc, done = 0, 2, []
    restarts_seen = -1  # what run_status.json said of restarts when the last fault fired

    def launch() -> tuple[subprocess.Popen, Watch]:
        nonlocal launches
        launches += 1
        log = work / f"soak-zero{stage}.launch{launches}.log"
        command = torchrun(run_dir, data, size, stage, nproc, max_restarts=len(faults))
        return start(command, log), Watch(run_dir, log, deadline)

    proc, watch = launch()
    try:
        for fault in faults:
            status = watch.wait(
                proc, f"step {fault.at_step}", lambda f=fault, w=watch, r=restarts_seen: w.step_reached(f.at_step, r)
            )
            if status is None:
                break
            restarts_seen, before = int(status.get("restarts", 0)), len(watch.resumes())
            if not inject(fault, proc, run_dir, watch, rng):
                break
            fired_at = time.monotonic()
            fault.fired_step, fault.world_size = int(read_status(run_dir).get("step", status["step"])), nproc
            print(
                f"fault {fault.number}/{len(faults)} at step {fault.fired_step} on {nproc} rank(s): "
                f"{fault.kind}: {fault.detail}",
                flush=True,
            )
            if fault.kind == "preempt":
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                record = read_status(run_dir)
                fault.detail += (
                    f"; torchrun exited {rc}; run_status {record.get('status')} at step {record.get('step')}"
                )
                nproc = 1 if nproc == 2 else 2  # requeued onto another allocation
                (proc, watch), before = launch(), 0
            resumed = watch.wait(proc, "the restart", lambda b=before, w=watch: w.resumes()[b:])
            restarted_at = time.monotonic()
            back = watch.wait(
                proc, "the way back", lambda f=fault, w=watch, r=restarts_seen: w.step_reached(f.fired_step, r)
            )
            if resumed is None or back is None:
                break
            fault.resumed_step = resumed[0]
            fault.recomputed_steps = max(0, fault.fired_step - fault.resumed_step)  # a stop saves a step on
            fault.restart_s = round(restarted_at - fired_at, 3)
            fault.lost_s = round(time.monotonic() - fired_at, 3)
            done.append(fault)
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        raise SystemExit(f"bench.soak: the run did not end within {timeout_s:.0f}s (see {watch.log})") from None
    finally:
        if proc.poll() is None:
            kill_job(proc)
    logs = "".join(p.read_text(errors="replace") for p in sorted(work.glob(f"soak-zero{stage}.launch*.log")))
    return {
        "run_dir": run_dir,
        "rc": rc,
        "launches": launches,
        "wall_s": time.monotonic() - began,
        "faults": done,
        "fallback_lines": FELL_BACK.findall(logs),
        "status": read_status(run_dir),
    }


def reference_run(data: str, work: Path, size: Size, stage: int, timeout_s: float) -> tuple[Path, float]:
    run_dir, log = work / f"reference-zero{stage}", work / f"reference-zero{stage}.log"
    began = time.monotonic()
    proc = start(torchrun(run_dir, data, size, stage, 2, 0), log)
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise SystemExit(f"bench.soak: the reference run did not end within {timeout_s:.0f}s ({log})") from None
    if rc != 0:
        raise SystemExit(f"bench.soak: the reference run failed (exit {rc}): see {log}")
    return run_dir, time.monotonic() - began


def final_weights(run_dir: Path) -> dict[str, Any]:
    from pretrain import checkpoint as ckpt
    from pretrain.export import consolidated_weights

    final = ckpt.latest_checkpoint(run_dir / "checkpoints")
    assert final is not None
    return consolidated_weights(final, ckpt.read_state(final)["zero_stage"])


def compare_weights(reference: Path, soaked: Path) -> dict[str, Any]:
    import torch

    a, b = final_weights(reference), final_weights(soaked)
    if a.keys() != b.keys():
        return {"weights_bitwise": False, "weights_max_abs_diff": float("inf"), "weights_max_rel_diff": float("inf")}
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    scale = max(float(a[k].float().abs().max()) for k in a)
    return {
        "weights_bitwise": all(torch.equal(a[k], b[k]) for k in a),
        "weights_max_abs_diff": diff,
        "weights_max_rel_diff": diff / scale if scale else 0.0,
    }


def soak_stage(data: str, work: Path, size: Size, stage: int, seed: int, timeout_s: float) -> dict[str, Any]:
    """The reference, the soak and the comparison for one ZeRO stage."""
    from pretrain.sample_audit import audit

    faults = draw_faults(size.faults, seed, size)
    reference, reference_s = reference_run(data, work, size, stage, timeout_s)
    run = soak_run(data, work, size, stage, faults, seed, timeout_s)
    status = run["status"]
    completed = run["rc"] == 0 and status.get("status") == "completed" and status.get("step") == size.total_steps
    counted = audit(run["run_dir"]) if completed else None
    weights = compare_weights(reference, run["run_dir"]) if completed else {}
    done: list[Fault] = run["faults"]
    row = {
        "stage": stage,
        "faults_scheduled": len(faults),
        "faults_survived": len(done) if completed else 0,
        "kinds": {kind: sum(f.kind == kind for f in done) for kind in ("kill", "stop", "corrupt", "preempt")},
        "world_sizes": [f.world_size for f in done],
        "completed": completed,
        "launches": run["launches"],
        "restarts": status.get("restarts"),
        "fallback_lines": run["fallback_lines"],
        "reference_wall_s": round(reference_s, 3),
        "soak_wall_s": round(run["wall_s"], 3),
        "overhead_s": round(run["wall_s"] - reference_s, 3),
        "restart_s_mean": round(sum(f.restart_s for f in done) / max(1, len(done)), 3),
        "lost_s_mean": round(sum(f.lost_s for f in done) / max(1, len(done)), 3),
        "lost_s_max": round(max((f.lost_s for f in done), default=0.0), 3),
        "recomputed_steps_mean": round(sum(f.recomputed_steps for f in done) / max(1, len(done)), 3),
        "recomputed_steps_max": max((f.recomputed_steps for f in done), default=0),
        "samples": counted.line() if counted else None,
        "samples_ok": bool(counted and counted.ok),
        "samples_repeated": counted.repeated if counted else None,
        "samples_missing": counted.missing if counted else None,
        **weights,
        "faults": [asdict(f) for f in done],
        "final_status": status,
    }
    row["ok"] = bool(
        completed
        and row["faults_survived"] == len(faults)
        and row["samples_ok"]
        and len(row["fallback_lines"]) >= row["kinds"]["corrupt"]
    )
    return row


def soak(data: str, work: Path, size: Size = QUICK, seed: int = 0, timeout_s: float = 1800.0) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    stages = [soak_stage(data, work, size, stage, seed, timeout_s) for stage in size.stages]
    return {
        "size": asdict(size),
        "seed": seed,
        "stages": stages,
        "faults_survived": sum(s["faults_survived"] for s in stages),
        "ok": all(s["ok"] for s in stages),
    }


# ---------------------------------------------------------------------------------------------- the CLI


def build_shards(out: Path) -> str:
    """The full soak's data: WikiText-2's validation text (shipped in demo/), tokenized by data_pipeline."""
    from data_pipeline.build import build
    from data_pipeline.config import BuildConfig

    if not (out / "manifest.json").is_file():
        config = BuildConfig(inputs=[str(CORPUS)], out_dir=str(out), vocab_size=2000, seq_len=64, shard_mb=0.05)
        build(config, workers=1, progress=False)
    return str(out)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| ZeRO | faults survived | kill / stop / corrupt / preempt | launches | restarts | lost s (mean / max) "
        "| steps recomputed (mean / max) | samples | final weights |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["stages"]:
        k = s["kinds"]
        weights = (
            "bitwise" if s.get("weights_bitwise") else f"max abs diff {s.get('weights_max_abs_diff', float('nan')):.2e}"
        )
        lines.append(
            f"| {s['stage']} | {s['faults_survived']}/{s['faults_scheduled']} | {k['kill']} / {k['stop']} / "
            f"{k['corrupt']} / {k['preempt']} | {s['launches']} | {s['restarts']} | {s['lost_s_mean']:.1f} / "
            f"{s['lost_s_max']:.1f} | {s['recomputed_steps_mean']:.1f} / {s['recomputed_steps_max']} | "
            f"{'exactly once' if s['samples_ok'] else 'OFF'} | {weights} |"
        )
    for s in result["stages"]:
        lines += [
            "",
            f"ZeRO-{s['stage']}, per fault:",
            "",
            "| # | kind | ranks | step | resumed at | recomputed | restart s | lost s | what |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for f in s["faults"]:
            lines.append(
                f"| {f['number']} | {f['kind']} | {f['world_size']} | {f['fired_step']} | {f['resumed_step']} | "
                f"{f['recomputed_steps']} | {f['restart_s']:.1f} | {f['lost_s']:.1f} | {f['detail']} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="ZeRO-2, 10 faults, a small model (the CI test's size)")
    parser.add_argument("--faults", type=int, default=None, help="faults per ZeRO stage (default 16, quick 10)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data", default=None, help="a data_pipeline build (default: WikiText-2 from demo/, built once)"
    )
    parser.add_argument("--work", type=Path, default=None, help="run folders (default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results.json and results.md go")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="per run (the reference, the soak)")
    args = parser.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.faults is not None:
        size = Size(**{**asdict(size), "faults": args.faults})
    import tempfile

    with contextlib.ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="soak-")))
        data = args.data or build_shards(work / "shards")
        result = soak(data, work, size, args.seed, args.timeout_s)
    given = sys.argv[1:] if argv is None else argv
    result = {"command": shlex.join(["python", "-m", "bench.soak", *given]), **result}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(args.out / "results.json", result)
    write_text_atomic(args.out / "results.md", markdown(result))
    print(markdown(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
