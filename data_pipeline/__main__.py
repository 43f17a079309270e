"""Command line: ``python -m data_pipeline COMMAND --help``.

Commands: build, plan, run-unit, finalize, train-tokenizer, inspect, and for ``--dedup global``
in distributed runs: hash-units, resolve-duplicates (between plan and run-unit).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common.config import add_flags, config_values

from .errors import DataPipelineError

PROG = "data_pipeline"


INPUT_FIELDS = ("text_field", "txt_mode", "hf_split", "on_error", "unicode_normalization", "min_chars", "dedup")
TOKENIZER_FIELDS = ("tokenizer_kind", "vocab_size", "lowercase", "min_frequency", "tokenizer_sample_mb")
PACKING_FIELDS = (
    "seq_len",
    "packing",
    "validation_fraction",
    "split_salt",
    "unit_mb",
    "shard_mb",
    "block_sequences",
    "batch_docs",
)


def _add_input_args(p: argparse.ArgumentParser) -> None:
    from .config import BuildConfig

    g = p.add_argument_group("inputs")
    g.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="files or globs (.txt[.gz|.zst], .jsonl[.gz|.zst], .parquet), a datasets "
        "save_to_disk folder (DIR or DIR@SPLIT), or hf:NAME[:CONFIG][@SPLIT] (streamed)",
    )
    add_flags(g, BuildConfig, INPUT_FIELDS)


def _add_tokenizer_args(p: argparse.ArgumentParser, with_file: bool = True) -> None:
    from .config import BuildConfig

    g = p.add_argument_group("tokenizer")
    add_flags(g, BuildConfig, (("tokenizer",) if with_file else ()) + TOKENIZER_FIELDS)


def _add_build_args(p: argparse.ArgumentParser) -> None:
    from .config import BuildConfig

    p.add_argument("--out", required=True, dest="out_dir", help="output folder")
    _add_input_args(p)
    _add_tokenizer_args(p)
    add_flags(p.add_argument_group("packing and shards"), BuildConfig, PACKING_FIELDS)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def config_from_args(a: argparse.Namespace, **fixed: Any):
    """The BuildConfig of a parsed `build`/`plan`/`train-tokenizer` command line (plus `fixed` values):
    the flags given, the model's defaults for the rest; a mistake names the flag."""
    from .config import BuildConfig

    values, sources = config_values(a, BuildConfig, rename={"out_dir": "--out"})
    return BuildConfig.with_sources({**values, **fixed}, sources)


def cmd_build(a) -> int:
    from .build import build, format_report
    from .shards import read_manifest

    path = build(config_from_args(a), workers=a.workers, progress=not a.no_progress, verify=a.verify)
    m = read_manifest(path)
    print(format_report(m["report"]))
    print(f"manifest: {path}")
    return 0


def cmd_plan(a) -> int:
    from .build import plan_units

    units = plan_units(config_from_args(a), progress=not a.no_progress)
    print(f"{len(units)} units planned in {a.out_dir} (config.json, tokenizer.json, _work/plan.json)")
    if a.list:
        for u in units:
            print(f"{u.index}\t{u.name}\t{u.describe()}")
    return 0


def cmd_run_unit(a) -> int:
    from .build import load_plan, run_unit
    from .config import load_config

    cfg = load_config(a.out)
    units = load_plan(cfg)
    for u in _chosen_units(a, units):
        r = run_unit(cfg, u)
        c = r["counts"]
        print(
            f"{u.name}: {c['docs_kept']:,} docs, {c['tokens_written']:,} tokens, "
            f"{sum(len(s['shards']) for s in r['splits'].values())} shards ({u.describe()})"
        )
    return 0


def _chosen_units(a, units):
    if a.all:
        return units
    if a.unit is None:
        raise DataPipelineError("give --unit INDEX (e.g. $SLURM_ARRAY_TASK_ID) or --all")
    bad = [i for i in a.unit if not 0 <= i < len(units)]
    if bad:
        raise DataPipelineError(f"unit index {bad[0]} out of range (the plan has {len(units)} units)")
    return [units[i] for i in a.unit]


def cmd_hash_units(a) -> int:
    from .build import load_plan
    from .config import load_config
    from .dedup import hash_unit

    cfg = load_config(a.out)
    for u in _chosen_units(a, load_plan(cfg)):
        print(f"{u.name}: {hash_unit(cfg, u)}")
    return 0


def cmd_resolve(a) -> int:
    from .build import load_plan
    from .config import load_config
    from .dedup import resolve_duplicates

    cfg = load_config(a.out)
    resolve_duplicates(cfg, load_plan(cfg))
    print(f"duplicate lists written under {cfg.work_dir / 'dups'}")
    return 0


def cmd_finalize(a) -> int:
    from .build import finalize, format_report
    from .shards import read_manifest

    path = finalize(a.out, verify=a.verify)
    print(format_report(read_manifest(path)["report"]))
    print(f"manifest: {path}")
    return 0


def cmd_train_tokenizer(a) -> int:
    import tempfile

    from .build import _training_texts
    from .readers import expand_inputs
    from .tokenizer import save_tokenizer, train_tokenizer
    from .units import plan

    out = Path(a.out)
    cfg = config_from_args(a, out_dir=tempfile.gettempdir(), validation_fraction=0.0)
    units = plan(expand_inputs(cfg.inputs, cfg.hf_split), cfg.unit_mb)
    tok = train_tokenizer(
        _training_texts(cfg, units, not a.no_progress),
        kind=cfg.tokenizer_kind,
        vocab_size=cfg.vocab_size,
        lowercase=cfg.lowercase,
        min_frequency=cfg.min_frequency,
        show_progress=not a.no_progress,
    )
    if out.suffix == ".json":  # a file name: just that file
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(out))
        path = out
    else:  # a folder: tokenizer.json + transformers side files
        path = save_tokenizer(tok, out)
    print(f"tokenizer ({cfg.tokenizer_kind}, vocab {tok.get_vocab_size():,}): {path}")
    return 0


def cmd_inspect(a) -> int:
    from .shards import iter_shard, read_manifest, shard_urls
    from .tokenizer import load_tokenizer

    m = read_manifest(a.path)
    root = Path(m["_root"])
    print(
        f"{root}: format {m['format_version']} ({m.get('block_sequences', 1)} sequences per tar member), seq_len {m['seq_len']}, vocab {m['vocab_size']:,} "
        f"({m['dtype']}), packing {m['packing']}"
    )
    for s, info in m["splits"].items():
        print(
            f"  {s:<11} {len(info['shards']):>6} shards {info['samples']:>12,} sequences {info['tokens']:>14,} tokens"
        )
    bad = 0
    if a.verify:
        from .verify import verify_build

        problems = verify_build(m)
        for line in problems[:50]:
            print(f"  PROBLEM {line}")
        bad = len(problems)
        print(f"  verified hashes, counts and keys of all shards: {'OK' if not bad else f'{bad} problems'}")
    if a.samples:
        tok = load_tokenizer(root / m["tokenizer"]["file"])
        urls = shard_urls(m, a.split)
        shown = 0
        for url in urls:
            for key, ids in iter_shard(url, m["seq_len"]):
                print(f"--- {key}\n{tok.decode(ids.tolist(), skip_special_tokens=False)}")
                shown += 1
                if shown >= a.samples:
                    break
            if shown >= a.samples:
                break
    return 1 if bad else 0


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m {PROG}",
        description=(
            "Preprocess text corpora into packed webdataset shards for pretraining. "
            "`build` does everything; `plan` + `run-unit` + `finalize` are the same steps for "
            "distributed runs (SLURM arrays)."
        ),
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    b = sub.add_parser(
        "build",
        help="plan, run all units on local processes, finalize",
        description="Build shards end to end; re-run the same command to resume.",
    )
    _add_build_args(b)
    b.add_argument("--workers", type=int, default=1, help="local processes (output does not depend on it)")
    b.add_argument("--verify", action="store_true", help="re-hash every shard before writing the manifest")
    b.set_defaults(func=cmd_build)

    pl = sub.add_parser(
        "plan",
        help="prepare the output folder (config, tokenizer, unit plan)",
        description="Prepare a build for distributed units: writes config.json, tokenizer.json and _work/plan.json.",
    )
    _add_build_args(pl)
    pl.add_argument("--list", action="store_true", help="print the units")
    pl.set_defaults(func=cmd_plan)

    r = sub.add_parser(
        "run-unit",
        help="run units of a planned build (e.g. one SLURM array task)",
        description="Run the given units (skipping finished ones) of a planned build.",
    )
    r.add_argument("--out", required=True, help="the planned output folder")
    r.add_argument("--unit", type=int, nargs="+", help="unit index(es), 0-based")
    r.add_argument("--all", action="store_true", help="every unit, in order")
    r.set_defaults(func=cmd_run_unit)

    h = sub.add_parser(
        "hash-units",
        help="dedup=global only: hash units (before run-unit)",
        description="Global dedup, step 1: write the document hashes of the given units.",
    )
    h.add_argument("--out", required=True, help="the planned output folder")
    h.add_argument("--unit", type=int, nargs="+", help="unit index(es), 0-based")
    h.add_argument("--all", action="store_true", help="every unit, in order")
    h.set_defaults(func=cmd_hash_units)

    rd = sub.add_parser(
        "resolve-duplicates",
        help="dedup=global only: find cross-unit duplicates",
        description="Global dedup, step 2 (after hash-units, before run-unit): for each unit, "
        "list the documents that an earlier unit already holds.",
    )
    rd.add_argument("--out", required=True)
    rd.set_defaults(func=cmd_resolve)

    f = sub.add_parser(
        "finalize",
        help="merge finished units into manifest.json",
        description="Write manifest.json once every unit is finished.",
    )
    f.add_argument("--out", required=True)
    f.add_argument("--verify", action="store_true", help="re-hash every shard")
    f.set_defaults(func=cmd_finalize)

    t = sub.add_parser(
        "train-tokenizer",
        help="train a tokenizer only",
        description="Train a tokenizer from a sample of the inputs and save tokenizer.json.",
    )
    t.add_argument("--out", required=True, help="a folder, or a .json file name")
    _add_input_args(t)
    _add_tokenizer_args(t, with_file=False)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=cmd_train_tokenizer)

    i = sub.add_parser(
        "inspect",
        help="summarise a build, verify hashes, print decoded samples",
        description="Summarise a finished build.",
    )
    i.add_argument("path", help="build folder or manifest.json")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256")
    i.add_argument("--samples", type=int, default=0, help="decode and print N sequences")
    i.add_argument("--split", default="train")
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    try:
        return args.func(args)
    except DataPipelineError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (re-run the same command to resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
