"""python -m slurm <stage> [cluster options] [--dry-run] [--wait] -- <stage arguments>

Cluster options come from the stage's defaults, then --config FILE (JSON), then flags."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from common.config import type_text
from slurm import submit as sub
from slurm.jobs import STAGES, Stage, StageError
from slurm.options import FIELDS, ClusterOptions, OptionsError, load_json, merge

EXIT_NO_LAUNCHER = 3


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_option_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster options (override --config)")
    for name, f in FIELDS.items():
        help = (f.description or "").replace("%", "%%")  # argparse formats help
        kind = type_text(f.annotation).split(" |")[0]
        if kind == "bool":
            g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help)
        elif name == "sbatch_args":  # object
            g.add_argument(
                "--sbatch-arg",
                dest=name,
                action="append",
                metavar="KEY[=VALUE]",
                default=argparse.SUPPRESS,
                help=help + "; repeatable",
            )
        elif kind == "list[str]":
            single = {"srun_args": "--srun-arg", "setup": "--setup"}[name]
            g.add_argument(
                single,
                dest=name,
                action="append",
                metavar="ARG" if name == "srun_args" else "LINE",
                default=argparse.SUPPRESS,
                help=help + "; repeatable",
            )
        else:
            g.add_argument(
                _flag(name),
                type={"int": int, "float": float}.get(kind, str),
                default=argparse.SUPPRESS,
                help=(help + f" (default {f.default!r})".replace("%", "%%")) if f.default is not None else help,
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m slurm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    stages = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES.values():
        p = stages.add_parser(
            stage.name,
            help=stage.summary,
            description=f"{stage.summary}. "
            f"Stage arguments go after `--` (list them with: python -m slurm {stage.name} -- --help); "
            f"without SLURM: {stage.direct}",
        )
        p.add_argument(
            "--config",
            metavar="FILE",
            help='JSON file of cluster options: {"partition": "gpu", ...} (names as below, with _)',
        )
        p.add_argument(
            "--dry-run", action="store_true", help="print the submitit parameters and the sbatch script; submit nothing"
        )
        p.add_argument(
            "--wait",
            action="store_true",
            help="wait for the job; on failure print the failing tasks' stderr tail and exit 1",
        )
        p.add_argument("--wait-timeout-s", type=float, default=None, help="give up waiting after this long")
        _add_option_flags(p)
    return parser


def _parse_sbatch_args(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        out[key.strip().lstrip("-")] = value if eq else True
    return out


def resolve_options(stage: Stage, args: argparse.Namespace) -> ClusterOptions:
    opts = merge(ClusterOptions(), stage.defaults, f"stage {stage.name} defaults")
    if args.config:
        opts = load_json(args.config, opts)
    flags = {k: v for k, v in vars(args).items() if k in FIELDS}
    # dict/list options add to the config's instead of replacing it
    if "sbatch_args" in flags:
        flags["sbatch_args"] = {**opts.sbatch_args, **_parse_sbatch_args(flags["sbatch_args"])}
    for name in ("srun_args", "setup"):
        if name in flags:
            flags[name] = [*getattr(opts, name), *flags[name]]
    return merge(opts, flags, "command line")


def _print_step(ss: sub.SubmittedStep, results: list[list[Any]]) -> None:
    line = ss.step.summary(results) if ss.step.summary else f"{len(results)} job(s) finished"
    print(f"{ss.name} (job {ss.job_id}) finished: {line}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    stage_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, stage_args = argv[:i], argv[i + 1 :]
    args = build_parser().parse_args(argv)
    stage = STAGES[args.stage]
    prog = f"python -m slurm {stage.name}"
    try:
        opts = resolve_options(stage, args)
    except OptionsError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if stage.build is None:
        print(
            f"{prog}: the SLURM launcher for stage '{stage.name}' is not written yet (slurm/jobs.py registers it "
            f"without one); nothing was submitted. Run the stage directly instead: {stage.direct}",
            file=sys.stderr,
        )
        return EXIT_NO_LAUNCHER
    try:
        steps = stage.steps(stage_args, opts, dry_run=args.dry_run)
    except (StageError, OptionsError) as e:
        print(f"{prog}: {e}\n(nothing was submitted)", file=sys.stderr)
        return 2
    except SystemExit as e:  # the stage's own argument parser: it printed its message (or --help)
        return e.code if isinstance(e.code, int) else 2

    if args.dry_run:
        print(sub.render_steps(opts, stage.name, steps))
        return 0
    try:
        submission = sub.submit_steps(opts, stage.name, steps)
    except RuntimeError as e:  # submitit: 'Could not detect "srun"', or sbatch refusing the job
        print(f"{prog}: {e} (local test cluster: slurm/local_cluster.sh start)", file=sys.stderr)
        return 2
    print(f"submitted {stage.name}: {submission.describe()}", flush=True)
    if not args.wait:
        return 0
    try:
        submission.wait(timeout_s=args.wait_timeout_s, on_step=_print_step)
    except (sub.JobFailed, TimeoutError) as e:
        print(str(e), file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(
            f"{prog}: stopped waiting; the jobs keep running (cancel them with: scancel "
            f"{' '.join(submission.job_ids)})",
            file=sys.stderr,
            flush=True,
        )
        return 130
    print(f"{stage.name}: all jobs finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
