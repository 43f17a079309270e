"""`python -m slurm preprocess [cluster options] -- <python -m data_pipeline build arguments>`

Steps (each a SLURM job; later ones wait for earlier ones with `afterok`):

    plan     one job: plan_units(cfg), i.e. config.json, the tokenizer (trained or copied), _work/plan.json
    hash     global dedup only: an array, hash_unit per unit
    resolve  global dedup only: one job, resolve_duplicates
    units    an array, run_unit per unit (capped by --array-parallelism)
    merge    one job, finalize: manifest.json

Planning is a job, not work done on the submitting host: training the tokenizer streams up to
--tokenizer-sample-mb (512 MB by default) of text and takes minutes and gigabytes there. The submitting
host only cuts the inputs into units (file sizes and metadata), which is what sizes the arrays; the plan
job checks that it finds the same units. Every job is idempotent (a unit whose done-marker exists is
skipped), so a requeued task or a resubmitted command picks up where the last one stopped, and a
resubmission only runs the units that are not done yet.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from slurm.jobs import RequeueableJob, StageError, Step, use_task_cpus
from slurm.options import ClusterOptions

ONE_TASK = {"nodes": 1, "tasks_per_node": 1}


def _log(msg: str) -> None:
    print(f"slurm preprocess: {msg}", flush=True)


class _PipelineJob(RequeueableJob):
    """A one-process data_pipeline job. It has no SIGTERM handler, so the pre-limit signal takes
    submitit's classic path: requeue at once; the requeued job redoes its (idempotent) work."""

    export_distributed_env = False

    def __call__(self) -> Any:
        use_task_cpus()
        began = time.perf_counter()
        result = super().__call__()
        _log(f"{type(self).__name__} done in {time.perf_counter() - began:.1f}s")
        return result


def _unit_of_plan(out_dir: str, unit: dict) -> tuple[Any, Any]:
    """The config and the unit this task was submitted for, checked against the plan on disk."""
    from data_pipeline.build import load_plan
    from data_pipeline.config import load_config
    from data_pipeline.errors import DataPipelineError

    cfg = load_config(out_dir)
    units = load_plan(cfg)
    index = unit["index"]
    if index >= len(units) or units[index].to_dict() != unit:
        raise DataPipelineError(
            f"{out_dir}: the plan on disk does not hold unit {unit['name']} as submitted "
            "(did the inputs change after submission?); resubmit the stage"
        )
    return cfg, units[index]


class PlanJob(_PipelineJob):
    def __init__(self, cfg: dict, expected_units: list[dict]) -> None:
        self.cfg, self.expected_units = cfg, expected_units

    def run(self) -> dict:
        from data_pipeline.build import plan_units
        from data_pipeline.config import BuildConfig
        from data_pipeline.errors import DataPipelineError

        cfg = BuildConfig.from_dict(self.cfg)
        _log(f"planning {cfg.out_dir} (tokenizer: {cfg.tokenizer or 'trained here'})")
        units = plan_units(cfg, progress=False)
        if [u.to_dict() for u in units] != self.expected_units:
            raise DataPipelineError(
                f"{cfg.out_dir}: planning found {len(units)} units, the submission "
                f"{len(self.expected_units)} others (did the inputs change?); resubmit the stage"
            )
        _log(f"{len(units)} units planned in {cfg.out_dir}")
        return {"out_dir": cfg.out_dir, "units": len(units)}


class HashJob(_PipelineJob):
    def __init__(self, out_dir: str, unit: dict) -> None:
        self.out_dir, self.unit = out_dir, unit

    def run(self) -> str:
        from data_pipeline.dedup import hash_unit

        cfg, unit = _unit_of_plan(self.out_dir, self.unit)
        path = hash_unit(cfg, unit)
        _log(f"{unit.name}: document hashes in {path} ({unit.describe()})")
        return str(path)


class ResolveJob(_PipelineJob):
    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def run(self) -> str:
        from data_pipeline.build import load_plan
        from data_pipeline.config import load_config
        from data_pipeline.dedup import resolve_duplicates

        cfg = load_config(self.out_dir)
        resolve_duplicates(cfg, load_plan(cfg))
        _log(f"duplicate lists written under {cfg.work_dir / 'dups'}")
        return str(cfg.work_dir / "dups")


class UnitJob(_PipelineJob):
    def __init__(self, out_dir: str, unit: dict) -> None:
        self.out_dir, self.unit = out_dir, unit

    def run(self) -> dict:
        from data_pipeline.build import run_unit

        cfg, unit = _unit_of_plan(self.out_dir, self.unit)
        result = run_unit(cfg, unit)
        counts = result["counts"]
        shards = sum(len(s["shards"]) for s in result["splits"].values())
        _log(
            f"{unit.name}: {counts['docs_kept']:,} docs, {counts['tokens_written']:,} tokens, {shards} shards "
            f"({unit.describe()})"
        )
        return {
            "unit": unit.name,
            "docs_kept": counts["docs_kept"],
            "tokens_written": counts["tokens_written"],
            "shards": shards,
        }


class MergeJob(_PipelineJob):
    def __init__(self, out_dir: str, verify: bool) -> None:
        self.out_dir, self.verify = out_dir, verify

    def run(self) -> dict:
        from data_pipeline.build import finalize, format_report
        from data_pipeline.shards import read_manifest

        path = finalize(self.out_dir, verify=self.verify)
        manifest = read_manifest(path)
        print(format_report(manifest["report"]), flush=True)
        _log(f"manifest: {path}")
        return {
            "manifest": str(path),
            "samples": {s: v["samples"] for s, v in manifest["splits"].items()},
            "shards": {s: len(v["shards"]) for s, v in manifest["splits"].items()},
        }


def parse_build_args(stage_args: list[str]) -> tuple[Any, Any]:
    """The `python -m data_pipeline build` arguments, parsed by its own parser, and the BuildConfig they
    make (the same function the local command uses, so a SLURM build and a local one share config.json)."""
    from data_pipeline.__main__ import config_from_args, make_parser

    args = make_parser().parse_args(["build", *stage_args])  # argparse prints its own error and exits 2
    return args, config_from_args(args)


def build(stage_args: list[str], options: ClusterOptions, dry_run: bool) -> list[Step]:
    from data_pipeline.build import load_plan
    from data_pipeline.config import load_config
    from data_pipeline.dedup import dups_path, hashes_path
    from data_pipeline.errors import DataPipelineError
    from data_pipeline.readers import expand_inputs
    from data_pipeline.units import plan, read_result

    if options.nodes > 1 or (options.tasks_per_node or 1) > 1:
        raise StageError(
            "preprocess jobs are one process each: parallelism comes from the array "
            "(--array-parallelism), not from --nodes/--tasks-per-node"
        )
    args, cfg = parse_build_args(stage_args)
    if args.workers != 1:
        print(
            f"python -m slurm preprocess: --workers {args.workers} is ignored: each array task runs one unit "
            "(cap them with --array-parallelism)",
            file=sys.stderr,
        )
    try:
        units = plan(expand_inputs(cfg.inputs, cfg.hf_split), cfg.unit_mb)
        if not units:
            raise DataPipelineError("the inputs contain nothing to process")
        todo, need_hashes, need_resolve = list(units), list(units), cfg.dedup == "global"
        if (cfg.out / "config.json").is_file():  # resubmitting into a started build
            old = load_config(cfg.out)
            if old.output_affecting() != cfg.output_affecting():
                diff = sorted(k for k, v in cfg.output_affecting().items() if old.output_affecting().get(k) != v)
                raise DataPipelineError(
                    f"{cfg.out}: already holds a build with different settings "
                    f"({', '.join(diff)}); use a new --out folder (or delete this one)"
                )
            planned = load_plan(old) if (cfg.work_dir / "plan.json").is_file() else None
            if planned is not None and planned == units:
                todo = [u for u in units if read_result(cfg.work_dir, u) is None]
                need_resolve = need_resolve and bool(todo) and not all(dups_path(cfg, u).is_file() for u in units)
                need_hashes = [u for u in units if not hashes_path(cfg, u).is_file()]
    except DataPipelineError as e:
        raise StageError(str(e)) from None

    out = str(cfg.out)
    one_task_no_gpu = {**ONE_TASK, "gpus_per_node": 0}
    steps = [
        Step(
            "plan",
            [PlanJob(cfg.to_dict(), [u.to_dict() for u in units])],
            options=one_task_no_gpu,
            summary=lambda r: f"{r[0][0]['units']} units planned in {r[0][0]['out_dir']}",
        )
    ]
    last = "plan"
    if need_resolve:
        if need_hashes:
            steps.append(
                Step(
                    "hash",
                    [HashJob(out, u.to_dict()) for u in need_hashes],
                    after=(last,),
                    options=ONE_TASK,
                    summary=lambda r: f"hashed {len(r)} units",
                )
            )
            last = "hash"
        steps.append(
            Step(
                "resolve",
                [ResolveJob(out)],
                after=(last,),
                options=one_task_no_gpu,
                summary=lambda r: f"cross-unit duplicates resolved ({r[0][0]})",
            )
        )
        last = "resolve"
    if todo:
        steps.append(
            Step(
                "units",
                [UnitJob(out, u.to_dict()) for u in todo],
                after=(last,),
                options=ONE_TASK,
                summary=lambda r: (
                    f"{len(r)} units: {sum(x[0]['tokens_written'] for x in r):,} tokens, "
                    f"{sum(x[0]['shards'] for x in r)} shards"
                ),
            )
        )
        last = "units"
    steps.append(
        Step(
            "merge",
            [MergeJob(out, bool(args.verify))],
            after=(last,),
            options=one_task_no_gpu,
            summary=lambda r: (
                f"manifest {r[0][0]['manifest']} ("
                + ", ".join(
                    f"{s}: {n} shards, {r[0][0]['samples'][s]:,} sequences" for s, n in r[0][0]["shards"].items()
                )
                + ")"
            ),
        )
    )
    done = len(units) - len(todo)
    print(
        f"python -m slurm preprocess: {len(units)} units" + (f" ({done} already done)" if done else "") + f" -> {out}",
        file=sys.stderr,
    )
    return steps
