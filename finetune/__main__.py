"""Command line: python -m finetune {train,sweep,run-one,aggregate,predict,submit,tasks} --help"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from common.config import add_flags, config_values
from finetune.config import PRECISIONS, FinetuneConfig
from finetune.data import HF_HUB_NAME
from finetune.errors import FinetuneError

# Flags whose spelling is not the field's name (kept as users type them).
FLAG_NAMES = {"learning_rate": "--lr", "save_model": "--save-model", "predict_test": "--predict"}
TRAINING_FIELDS = (
    "epochs",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "adam_eps",
    "dropout",
    "max_seq_len",
    "extend_positions",
    "long_inputs",
    "window_stride",
    "max_train_examples",
    "eval_batch_size",
    "device",
    "precision",
    "save_model",
    "predict_test",
)
# Your own data (finetune.files): the flags that go with --train-file.
FILE_FIELDS = (
    "dev_file",
    "test_file",
    "dev_size",
    "text_field",
    "text_pair_field",
    "label_field",
    "id_field",
    "problem",
)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except FinetuneError as err:
        print(f"finetune: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finetune: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune",
        description="Fine-tune released HyperMixer (and baseline) "
        "encoders on GLUE; sweeps, result tables and GLUE submission files.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser(
        "train",
        help="fine-tune one release on one task",
        description="Fine-tune a release on a GLUE task or on your own files (--train-file): dev "
        "evaluation after each epoch, the best epoch kept in <output-dir>/model, test predictions in "
        "<output-dir>/predictions.",
    )
    add_flags(
        train,
        FinetuneConfig,
        ("release", "task", "output_dir", "from_scratch", "learning_rate", "batch_size", "seed"),
        rename=FLAG_NAMES,
    )
    _data_args(train, files=True)
    _training_args(train)
    train.set_defaults(func=cmd_train)

    sweep = commands.add_parser(
        "sweep",
        help="plan and run a grid of runs, then aggregate",
        description="Plan a grid over release x init x task x learning rate x batch size x seed "
        "into <sweep-dir>/plan.json, run it here one run after another (finished runs are "
        "skipped), then aggregate. With --plan-only, stop after planning (for a SLURM array: "
        "python -m slurm, or `run-one --index i` per array task).",
    )
    sweep.add_argument("--sweep-dir", required=True)
    sweep.add_argument(
        "--release",
        action="append",
        required=True,
        dest="releases",
        help="release folder, or LABEL=FOLDER; repeat for several",
    )
    sweep.add_argument(
        "--tasks",
        default="all",
        help="'all' (the nine) or a comma-separated list (default: all); with --train-file, the task's name",
    )
    sweep.add_argument(
        "--lrs", type=_floats, default=(2e-5, 3e-5, 5e-5), help="comma-separated (default: 2e-5,3e-5,5e-5)"
    )
    sweep.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="comma-separated (default: 0,1,2)")
    sweep.add_argument("--batch-sizes", type=_ints, default=(32,), help="comma-separated (default: 32)")
    sweep.add_argument(
        "--init",
        type=lambda s: s.split(","),
        default=["pretrained"],
        help="pretrained, scratch or pretrained,scratch (default: pretrained)",
    )
    sweep.add_argument("--plan-only", action="store_true", help="write plan.json and stop")
    search = sweep.add_argument_group(
        "random search",
        "--search random draws --trials settings from a search space instead of the grid (--lrs, --seeds and "
        "--batch-sizes are then unused); every model and task gets the same trials",
    )
    search.add_argument("--search", choices=("grid", "random"), default="grid", help="(default: grid)")
    search.add_argument("--trials", type=int, default=20, help="random search: trials per model and task (default: 20)")
    search.add_argument("--space", help="random search: a search-space JSON file, or a shipped preset: small, base")
    search.add_argument("--search-seed", type=int, default=0, help="random search: the draws' seed (default: 0)")
    _data_args(sweep, files=True)
    _training_args(sweep)
    sweep.set_defaults(func=cmd_sweep)

    one = commands.add_parser(
        "run-one",
        help="run one planned run of a sweep (a SLURM array task)",
        description="Run the run at --index (default: $SLURM_ARRAY_TASK_ID) or --name of "
        "<sweep-dir>/plan.json; a run already done is skipped.",
    )
    one.add_argument("--sweep-dir", required=True)
    pick = one.add_mutually_exclusive_group()
    pick.add_argument("--index", type=int)
    pick.add_argument("--name")
    one.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    one.set_defaults(func=cmd_run_one)

    agg = commands.add_parser(
        "aggregate",
        help="results.json, results.md and results.png of a sweep",
        description="Per model and task: the median over seeds of the best (lr, batch size), the "
        "best single run, and the GLUE score when all nine tasks are there.",
    )
    agg.add_argument("--sweep-dir", required=True)
    agg.set_defaults(func=cmd_aggregate)

    predict = commands.add_parser(
        "predict",
        help="test-set predictions from a fine-tuned model folder",
        description="Predict the test sets of the task a model was fine-tuned on (MNLI: "
        "also AX) and write them as the GLUE server expects.",
    )
    predict.add_argument("--model", required=True, help="a run's model/ folder")
    predict.add_argument("--out-dir", required=True)
    predict.add_argument("--task", help="check that the model was fine-tuned on this task")
    predict.add_argument("--device", default="auto")
    predict.add_argument("--precision", default="auto", choices=PRECISIONS)
    predict.add_argument("--batch-size", type=int, default=128)
    _data_args(predict, test_file=True)
    predict.set_defaults(func=cmd_predict)

    submit = commands.add_parser(
        "submit",
        help="zip test predictions for the GLUE server",
        description="Zip prediction files into submission.zip. From a sweep: per task, the "
        "predictions of the run with the best dev score.",
    )
    source = submit.add_mutually_exclusive_group(required=True)
    source.add_argument("--sweep-dir")
    source.add_argument("--predictions", action="append", help="folder of prediction files; repeat for several")
    submit.add_argument("--model", help="with --sweep-dir: which model's runs (needed when the sweep has several)")
    submit.add_argument("--out", help="zip path (default: <sweep-dir>/submission.zip, else ./submission.zip)")
    submit.set_defaults(func=cmd_submit)

    tasks = commands.add_parser("tasks", help="list the tasks, their labels, metrics and files")
    tasks.set_defaults(func=cmd_tasks)
    return parser


def _data_args(parser: argparse.ArgumentParser, files: bool = False, test_file: bool = False) -> None:
    """The data source: a GLUE folder, Hugging Face `datasets`, or (`files`) the user's own files;
    `test_file`: a file to predict with a model fine-tuned on the user's files."""
    group = parser.add_mutually_exclusive_group(required=True)
    if files:
        group.add_argument(
            "--train-file",
            help="your own labelled data instead of GLUE: a .jsonl, .csv or .tsv file (optionally .gz); "
            "with --dev-file or --dev-size, and the columns named by --text-field, --label-field",
        )
    if test_file:
        group.add_argument("--test-file", help="for a model fine-tuned on your own files: the rows to predict")
    group.add_argument("--glue-dir", help="GLUE folder: <glue-dir>/<TASK>/{train,dev,test}.tsv")
    group.add_argument(
        "--hf",
        dest="hf_dataset",
        nargs="?",
        const=HF_HUB_NAME,
        metavar="NAME_OR_FOLDER",
        help=f"Hugging Face `datasets`: a hub name (default {HF_HUB_NAME}) or a folder of "
        "DatasetDict.save_to_disk copies (<folder>/<config>, e.g. <folder>/cola)",
    )
    if files:
        add_flags(parser, FinetuneConfig, FILE_FIELDS)


def _training_args(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, FinetuneConfig, TRAINING_FIELDS, rename=FLAG_NAMES)
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress bar per epoch (default: only on a terminal)",
    )


def _settings(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """The FinetuneConfig fields given on the command line (the rest keep the model's defaults), and
    the flag each came from (so a mistake names it)."""
    values, sources = config_values(args, FinetuneConfig, rename=FLAG_NAMES)
    return (
        {k: v for k, v in values.items() if k not in skip and v is not None},
        {k: v for k, v in sources.items() if k not in skip},
    )


def sweep_settings(args: argparse.Namespace) -> dict:
    """The FinetuneConfig settings a parsed `sweep` command line gives every run of the grid (the grid's
    own axes, learning rate, batch size and seed, excluded). Public: the SLURM launcher plans with it."""
    return _settings(args, skip=("learning_rate", "batch_size", "seed"))[0]


def plan_from_args(args: argparse.Namespace, sweep_dir: str | Path) -> list:
    """Plan a parsed `sweep` command line into sweep_dir: the grid, or the random search's trials.
    Public: the SLURM launcher plans with it."""
    from finetune.sweep import plan_sweep

    settings = sweep_settings(args)
    if args.search == "random":
        from finetune.search import plan_random

        if args.space is None:
            raise FinetuneError("--search random needs --space FILE or a preset (small, base)")
        return plan_random(
            sweep_dir, args.releases, args.tasks, args.space, args.trials, args.search_seed, args.init, **settings
        )
    return plan_sweep(
        sweep_dir, args.releases, args.tasks, args.lrs, args.seeds, args.batch_sizes, args.init, **settings
    )


def cmd_train(args: argparse.Namespace) -> int:
    from finetune.trainer import train

    values, sources = _settings(args)
    config = FinetuneConfig.with_sources(values, sources)
    result = train(config, progress=args.progress)
    print(
        json.dumps(
            {
                "task": result["task"],
                "score": result["score"],
                "dev": result["dev"],
                "best_epoch": result["best_epoch"],
                "output_dir": config.output_dir,
            },
            indent=2,
        )
    )
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from finetune.sweep import run_sweep

    specs = plan_from_args(args, args.sweep_dir)
    print(f"finetune: planned {len(specs)} runs in {Path(args.sweep_dir) / 'plan.json'}")
    if args.plan_only:
        return 0
    summary = run_sweep(args.sweep_dir, progress=args.progress)
    print((Path(args.sweep_dir) / "results.md").read_text())
    return 0 if not summary["missing_runs"] else 1


def cmd_run_one(args: argparse.Namespace) -> int:
    from finetune.sweep import load_plan, run_one

    specs = load_plan(args.sweep_dir)
    if args.name is not None:
        chosen = [s for s in specs if s.name == args.name]
        if not chosen:
            raise FinetuneError(f"{args.sweep_dir}: no planned run named {args.name!r}")
        spec = chosen[0]
    else:
        index = args.index if args.index is not None else os.environ.get("SLURM_ARRAY_TASK_ID")
        if index is None:
            raise FinetuneError("give --index or --name (or run as a SLURM array task)")
        if not 0 <= int(index) < len(specs):
            raise FinetuneError(f"run index {index} is outside the plan's 0..{len(specs) - 1}")
        spec = specs[int(index)]
    result = run_one(spec, progress=args.progress)
    print(json.dumps({"run": spec.name, "score": result["score"], "dev": result["dev"]}, indent=2))
    return 0


def cmd_aggregate(args: argparse.Namespace) -> int:
    from finetune.sweep import aggregate

    summary = aggregate(args.sweep_dir)
    print((Path(args.sweep_dir) / "results.md").read_text())
    print(f"finetune: wrote results.json, results.md, results.png in {args.sweep_dir}", file=sys.stderr)
    return 0 if not summary["missing_runs"] else 1


def cmd_predict(args: argparse.Namespace) -> int:
    from finetune.submission import predict_model

    written = predict_model(
        args.model,
        args.out_dir,
        args.glue_dir,
        args.hf_dataset,
        args.task,
        args.device,
        args.precision,
        args.batch_size,
        args.test_file,
    )
    for path in written:
        print(path)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from finetune.submission import prediction_files, write_submission

    if args.sweep_dir:
        files = _best_predictions(Path(args.sweep_dir), args.model)
        out = args.out or str(Path(args.sweep_dir) / "submission.zip")
    else:
        files = [f for folder in args.predictions for f in prediction_files(folder)]
        out = args.out or "submission.zip"
    report = write_submission(files, out)
    print(f"finetune: wrote {report['zip']} with {len(report['files'])} files: {', '.join(report['files'])}")
    if report["missing"]:
        print(
            f"finetune: warning: the GLUE server wants all 11 files; missing {', '.join(report['missing'])}",
            file=sys.stderr,
        )
    for name, counts in report["unexpected_row_counts"].items():
        print(
            f"finetune: warning: {name} has {counts['rows']} rows; the GLUE test set has {counts['expected']}",
            file=sys.stderr,
        )
    return 0


def _best_predictions(sweep_dir: Path, model: str | None) -> list[Path]:
    from finetune.submission import prediction_files
    from finetune.sweep import aggregate

    summary = aggregate(sweep_dir)
    models = summary["models"]
    if model is None:
        if len(models) > 1:
            raise FinetuneError(f"{sweep_dir} has several models ({', '.join(models)}); choose one with --model")
        model = next(iter(models))
    if model not in models:
        raise FinetuneError(f"{sweep_dir}: no model {model!r} (found: {', '.join(models)})")
    files = []
    for entry in models[model]["tasks"].values():
        found = prediction_files(sweep_dir / "runs" / entry["best"]["run"] / "predictions")
        if not found:
            print(f"finetune: warning: {entry['best']['run']} has no test predictions", file=sys.stderr)
        files += found
    return files


def cmd_tasks(args: argparse.Namespace) -> int:
    from finetune.tasks import TASKS

    for task in TASKS.values():
        labels = "regression 0..5" if task.labels is None else "/".join(task.labels)
        files = [
            s.file
            for s in ([task.train] if task.train else []) + [x for ev in task.evals for x in (ev.dev, ev.test) if x]
        ]
        metrics = ", ".join(task.metrics) or f"(predicted by the {task.predicted_by} model)"
        print(f"{task.name:6} {labels:36} {metrics:18} {' '.join(files)}")
    return 0


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


if __name__ == "__main__":
    sys.exit(main())
