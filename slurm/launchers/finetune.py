"""`python -m slurm finetune [cluster options] -- <python -m finetune sweep arguments>`

The sweep is planned on the submitting host (`plan_sweep` only expands the grid and writes
<sweep-dir>/plan.json), then:

    runs       an array, `run_one` per planned run that has no result.json yet
    aggregate  one job, `aggregate`: results.json, results.md, results.png; it runs after the array
               whatever happened to single runs (afterany), so a failed run leaves the others' table

A run is redone from the start when requeued (a half-finished run holds no result).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from slurm.jobs import RequeueableJob, StageError, Step, use_task_cpus
from slurm.options import ClusterOptions


class RunJob(RequeueableJob):
    export_distributed_env = False

    def __init__(self, spec: dict) -> None:
        self.spec = spec

    def run(self) -> dict:
        use_task_cpus()
        from finetune.sweep import run_one

        result = run_one(self.spec, progress=False)
        print(
            f"slurm finetune: {self.spec['name']}: score {result['score']:.4f} ({self.spec['config']['output_dir']})",
            flush=True,
        )
        return {"run": self.spec["name"], "score": result["score"], "dev": result["dev"]}


class AggregateJob(RequeueableJob):
    export_distributed_env = False

    def __init__(self, sweep_dir: str) -> None:
        self.sweep_dir = sweep_dir

    def run(self) -> dict:
        from finetune.sweep import aggregate

        summary = aggregate(self.sweep_dir)
        table = Path(self.sweep_dir) / "results.md"
        print(table.read_text(), flush=True)
        print(
            f"slurm finetune: {summary['runs_done']} of {summary['runs_planned']} runs done; wrote results.json, "
            f"results.md, results.png in {self.sweep_dir}",
            flush=True,
        )
        return {
            "results_md": str(table),
            "runs_done": summary["runs_done"],
            "runs_planned": summary["runs_planned"],
            "missing_runs": summary["missing_runs"],
        }


def parse_sweep_args(stage_args: list[str]) -> Any:
    from finetune.__main__ import build_parser

    args = build_parser().parse_args(["sweep", *stage_args])  # argparse prints its own error and exits 2
    if args.plan_only:
        raise StageError(
            "--plan-only: the SLURM launcher plans and submits; plan without SLURM with "
            "`python -m finetune sweep --plan-only ...`"
        )
    return args


def plan(args: Any, sweep_dir: Path) -> list[Any]:
    """plan_sweep into sweep_dir, exactly as `python -m finetune sweep` does; the whole plan (earlier
    plannings into the same folder included)."""
    from finetune.__main__ import plan_from_args
    from finetune.sweep import load_plan

    plan_from_args(args, sweep_dir)
    return load_plan(sweep_dir)


def build(stage_args: list[str], options: ClusterOptions, dry_run: bool) -> list[Step]:
    from finetune.errors import FinetuneError
    from finetune.trainer import RESULT_FILE

    if options.nodes > 1 or (options.tasks_per_node or 1) > 1:
        raise StageError(
            "fine-tuning runs are one process each: parallelism comes from the array "
            "(--array-parallelism), not from --nodes/--tasks-per-node"
        )
    args = parse_sweep_args(stage_args)
    sweep_dir = Path(args.sweep_dir).resolve()
    try:
        if dry_run:  # plan into a copy: validates the grid and counts runs without writing the sweep folder
            with tempfile.TemporaryDirectory() as tmp:
                _copy_plan(sweep_dir, Path(tmp))
                specs = plan(args, Path(tmp))
            specs = [_moved(s, sweep_dir) for s in specs]
        else:
            specs = plan(args, sweep_dir)
    except FinetuneError as err:
        raise StageError(str(err)) from None
    todo = [s for s in specs if not (s.output_dir / RESULT_FILE).is_file()]
    print(
        f"python -m slurm finetune: {len(specs)} runs planned in {sweep_dir / 'plan.json'}"
        + (f", {len(specs) - len(todo)} already done" if len(todo) < len(specs) else ""),
        file=sys.stderr,
    )
    one_task = {"nodes": 1, "tasks_per_node": 1}
    steps = []
    if todo:
        steps.append(
            Step(
                "runs",
                [RunJob(s.to_dict()) for s in todo],
                options=one_task,
                summary=lambda r: "runs: " + ", ".join(f"{x[0]['run']} {x[0]['score']:.4f}" for x in r),
            )
        )
    steps.append(
        Step(
            "aggregate",
            [AggregateJob(str(sweep_dir))],
            after=("runs",) if todo else (),
            condition="afterany",
            options={**one_task, "gpus_per_node": 0},
            summary=lambda r: (
                f"{r[0][0]['runs_done']} of {r[0][0]['runs_planned']} runs done; table {r[0][0]['results_md']}"
            ),
        )
    )
    return steps


def _copy_plan(sweep_dir: Path, scratch: Path) -> None:
    """The sweep's plan.json (and a random search's search.json), if any, as if it had been planned into
    `scratch` (so that planning there sees the same runs, and refuses the same conflicting settings)."""
    if (sweep_dir / "search.json").is_file():
        (scratch / "search.json").write_text((sweep_dir / "search.json").read_text())
    source = sweep_dir / "plan.json"
    if not source.is_file():
        return
    plan_data = json.loads(source.read_text())
    for run in plan_data.get("runs", []):
        if run.get("config", {}).get("output_dir") == str(sweep_dir / "runs" / run.get("name")):
            run["config"]["output_dir"] = str(scratch / "runs" / run["name"])
    (scratch / "plan.json").write_text(json.dumps(plan_data))


def _moved(spec: Any, sweep_dir: Path) -> Any:
    """A spec planned into a scratch folder, as it would be in the real sweep folder."""
    from finetune.sweep import RunSpec

    config = {**spec.config, "output_dir": str(sweep_dir / "runs" / spec.name)}
    return RunSpec(spec.name, spec.model, spec.task, config, spec.trial)
