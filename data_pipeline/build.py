"""The build: plan units -> run units (any number of processes, any order) -> finalize.

Stable API (the SLURM launcher calls exactly this)::

    units = plan_units(cfg)        # once, in the driver: writes config.json, trains or copies
                                   # the tokenizer, writes _work/plan.json; deterministic
    run_unit(cfg, unit)            # in any process, any order, any number of times:
                                   # skips a finished unit, else redoes it from scratch
    finalize(cfg)                  # merges unit results in unit order -> manifest.json

    build(cfg, workers=K)          # all three, with K local processes

Array tasks can rebuild ``cfg`` from the folder with ``load_config(out_dir)`` and the units
with ``load_plan(cfg)``; ``Unit`` and ``BuildConfig`` are plain picklable dataclasses too.
"""

from __future__ import annotations

import fcntl
import json
import multiprocessing as mp
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from contextlib import contextmanager
from multiprocessing.managers import SyncManager
from pathlib import Path

from common.files import sha256_file, write_json_atomic

from .config import BuildConfig, as_config, load_config
from .dedup import dups_path, hash_unit, load_drop_set, resolve_duplicates
from .documents import DocFilter
from .errors import DataPipelineError
from .orphans import die_with_parent
from .packing import Packer
from .readers import ReadStats, expand_inputs, iter_docs
from .shards import FORMAT_VERSION, MANIFEST_NAME, SPLITS, TOKENIZER_NAME, ShardWriter, dtype_for_vocab
from .tokenizer import BulkEncoder, copy_tokenizer, load_tokenizer, save_tokenizer, special_ids, train_tokenizer
from .units import Unit, plan, read_result, result_path

PLAN_NAME = "plan.json"
# Called in the process that writes them with each shard's record, right after its rename; empty in real
# builds (the kill-and-resume tests install a hook that SIGKILLs the build mid-unit).
SHARD_DONE_HOOKS: list[Callable[[dict], None]] = []
RESULT_VERSION = 1


# --------------------------------------------------------------------------- plan


def _plan_file(cfg: BuildConfig) -> Path:
    return cfg.work_dir / PLAN_NAME


def _training_texts(cfg: BuildConfig, units: list[Unit], progress: bool) -> Iterator[str]:
    """Up to ``tokenizer_sample_mb`` of kept *training* text, spread evenly over the units."""
    budget = max(1, int(cfg.tokenizer_sample_mb * (1 << 20)) // max(1, len(units)))
    total = sum(min(budget, u.est_bytes) if u.est_bytes else budget for u in units)
    bar = _bar(progress, total=total, desc="tokenizer sample", unit="B")
    for unit in units:
        used = 0
        filt = DocFilter(cfg, dedup=False)
        for t, is_val in filt(iter_docs(unit, cfg, ReadStats())):
            if is_val:
                continue
            yield t
            used += len(t)
            if bar is not None:
                bar.update(len(t))
            if used >= budget:
                break
    if bar is not None:
        bar.close()


def _bar(enabled: bool, **kw):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(dynamic_ncols=True, unit_scale=True, **kw)


def plan_units(cfg: BuildConfig, progress: bool = False) -> list[Unit]:
    """Prepare the output folder and return the deterministic list of units.

    Call once, in the driver, before running units anywhere: it validates the config,
    stores it as ``config.json``, trains (or copies) the tokenizer into ``tokenizer.json``
    and writes ``_work/plan.json``.  Calling it again with the same config and inputs is
    cheap and returns the same units (the tokenizer is not retrained); a different config or
    changed inputs are refused, so a resumed build cannot mix two plans.
    """
    cfg = as_config(cfg)
    out = cfg.out
    out.mkdir(parents=True, exist_ok=True)
    cfg_file = out / "config.json"
    if cfg_file.is_file():
        old = load_config(cfg_file)
        if old.output_affecting() != cfg.output_affecting():
            diff = sorted(k for k, v in cfg.output_affecting().items() if old.output_affecting().get(k) != v)
            raise DataPipelineError(
                f"{out}: already holds a build with different settings ({', '.join(diff)}); "
                "use a new --out folder (or delete this one)"
            )
    sources = expand_inputs(cfg.inputs, cfg.hf_split)
    units = plan(sources, cfg.unit_mb)
    if not units:
        raise DataPipelineError("the inputs contain nothing to process")
    plan_file = _plan_file(cfg)
    old_plan = _read_plan_file(plan_file) if plan_file.is_file() else None
    if old_plan is not None and old_plan["units"] != [u.to_dict() for u in units]:
        raise DataPipelineError(
            f"{out}: the inputs changed since this build was planned "
            "(files added, removed or resized); use a new --out folder"
        )
    cfg.save(cfg_file)
    tok_file = out / TOKENIZER_NAME
    if old_plan is not None and cfg.tokenizer:
        from .tokenizer import resolve_tokenizer_file

        if sha256_file(resolve_tokenizer_file(cfg.tokenizer)) != old_plan["tokenizer_sha256"]:
            raise DataPipelineError(
                f"{cfg.tokenizer}: tokenizer changed since {out} was planned; use a new --out folder"
            )
    if old_plan is not None and tok_file.is_file() and sha256_file(tok_file) == old_plan["tokenizer_sha256"]:
        pass  # resuming: keep the tokenizer the finished units were made with
    elif cfg.tokenizer:
        copy_tokenizer(cfg.tokenizer, out, cfg.special_tokens)
    else:
        tok = train_tokenizer(
            _training_texts(cfg, units, progress),
            kind=cfg.tokenizer_kind,
            vocab_size=cfg.vocab_size,
            lowercase=cfg.lowercase,
            min_frequency=cfg.min_frequency,
            specials=cfg.special_tokens,
            show_progress=progress,
        )
        save_tokenizer(tok, out, cfg.special_tokens, model_max_length=cfg.seq_len)
    tok = load_tokenizer(tok_file)
    special_ids(tok, cfg.special_tokens)
    (cfg.work_dir / "units").mkdir(parents=True, exist_ok=True)
    write_json_atomic(
        plan_file,
        {
            "units": [u.to_dict() for u in units],
            "inputs": [s.__dict__ for s in sources],
            "tokenizer_sha256": sha256_file(tok_file),
            "vocab_size": tok.get_vocab_size(),
        },
    )
    return units


def _read_plan_file(p: Path) -> dict:
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataPipelineError(f"{p}: corrupt plan ({e}); delete it and plan again") from None


def load_plan(cfg) -> list[Unit]:
    """The units written by :func:`plan_units` (for array tasks)."""
    cfg = as_config(cfg)
    p = _plan_file(cfg)
    if not p.is_file():
        raise DataPipelineError(f"{p}: no plan (run `python -m data_pipeline plan` first)")
    return [Unit.from_dict(d) for d in _read_plan_file(p)["units"]]


# --------------------------------------------------------------------------- one unit


@contextmanager
def _unit_lock(cfg: BuildConfig, unit: Unit):
    """Exclusive per-unit lock, so two processes never write the same unit's shards
    (e.g. an orphaned worker of a killed run and the re-run)."""
    d = cfg.work_dir / "locks"
    d.mkdir(parents=True, exist_ok=True)
    with open(d / f"{unit.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_unit_files(cfg: BuildConfig, unit: Unit) -> None:
    for split in SPLITS:
        d = cfg.out / split
        if d.is_dir():
            for p in d.glob(f"{unit.name}-[0-9][0-9][0-9][0-9][0-9].tar*"):
                p.unlink()


def run_unit(cfg, unit: Unit, progress: Callable[[int], None] | None = None) -> dict:
    """Process one unit into its shards and write its done-marker; idempotent.

    If the unit's done-marker exists, return its stored result without doing anything.
    Otherwise delete whatever an earlier, interrupted attempt left of this unit and redo it:
    shards are written under ``.tmp`` names and renamed when complete, and the result JSON
    (the done-marker) is written atomically last.  ``progress`` receives input characters read.
    """
    cfg = as_config(cfg)
    done = read_result(cfg.work_dir, unit)
    if done is not None:
        return done
    with _unit_lock(cfg, unit):
        done = read_result(cfg.work_dir, unit)  # another process may have finished it meanwhile
        if done is not None:
            return done
        return _run_unit_locked(cfg, unit, progress)


def _shard_done(record: dict) -> None:
    for hook in SHARD_DONE_HOOKS:
        hook(record)


def _run_unit_locked(cfg: BuildConfig, unit: Unit, progress) -> dict:
    t0 = time.perf_counter()
    plan_info = _read_plan_file(_plan_file(cfg)) if _plan_file(cfg).is_file() else None
    if plan_info is None:
        raise DataPipelineError(f"{_plan_file(cfg)}: no plan (run plan_units / `plan` first)")
    tok_file = cfg.out / TOKENIZER_NAME
    if not tok_file.is_file() or sha256_file(tok_file) != plan_info["tokenizer_sha256"]:
        raise DataPipelineError(f"{tok_file}: missing or changed since planning")
    tok = load_tokenizer(tok_file)
    sids = special_ids(tok, cfg.special_tokens)
    vocab = tok.get_vocab_size()
    dtype = dtype_for_vocab(vocab)
    encoder = BulkEncoder(tok)
    _remove_unit_files(cfg, unit)

    shard_bytes = int(cfg.shard_mb * (1 << 20))
    packers = {s: Packer(cfg.seq_len, sids["cls"], sids["sep"], sids["pad"], cfg.packing) for s in SPLITS}
    writers = {
        s: ShardWriter(
            cfg.out,
            s,
            unit.name,
            dtype,
            cfg.seq_len,
            sids["pad"],
            shard_bytes,
            block_sequences=cfg.block_sequences,
            on_shard_done=_shard_done if SHARD_DONE_HOOKS else None,
        )
        for s in SPLITS
    }
    stats = ReadStats()
    filt = DocFilter(cfg, drop=load_drop_set(cfg, unit) if cfg.dedup == "global" else None)
    per_split = {s: {"docs": 0, "doc_tokens": 0} for s in SPLITS}
    no_tokens = 0
    chars = 0

    def flush(split: str, texts: list[str]):
        nonlocal no_tokens
        flat, lengths = encoder.encode(texts)
        if (lengths == 0).any():  # e.g. a document of control characters only
            no_tokens += int((lengths == 0).sum())
            lengths = lengths[lengths > 0]
        per_split[split]["docs"] += len(lengths)
        per_split[split]["doc_tokens"] += int(lengths.sum())
        writers[split].write(packers[split].add(flat, lengths))

    pending = {s: [] for s in SPLITS}
    reported = 0
    try:
        for text, is_val in filt(iter_docs(unit, cfg, stats)):
            split = "validation" if is_val else "train"
            buf = pending[split]
            buf.append(text)
            if len(buf) >= cfg.batch_docs:
                n = sum(map(len, buf))
                chars += n
                flush(split, buf)
                pending[split] = []
                if progress is not None:
                    progress(n)
                    reported += n
        for split in SPLITS:
            if pending[split]:
                n = sum(map(len, pending[split]))
                chars += n
                flush(split, pending[split])
                if progress is not None:
                    progress(n)
                    reported += n
            writers[split].write(packers[split].finish())
        records = {s: writers[s].close() for s in SPLITS}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if progress is not None and unit.est_bytes > reported:
        progress(unit.est_bytes - reported)
    seconds = time.perf_counter() - t0
    splits = {}
    for s in SPLITS:
        recs = records[s]
        splits[s] = {
            "shards": recs,
            "samples": sum(r["samples"] for r in recs),
            "tokens": sum(r["tokens"] for r in recs),
            **per_split[s],
        }
    result = {
        "result_version": RESULT_VERSION,
        "unit": unit.to_dict(),
        "tokenizer_sha256": plan_info["tokenizer_sha256"],
        "splits": splits,
        "counts": {
            "docs_read": stats.docs_read,
            "docs_kept": sum(per_split[s]["docs"] for s in SPLITS),
            "dropped": {**filt.dropped, "no_tokens": no_tokens, "bad_record": stats.bad_records},
            "corrupt_files": stats.corrupt_files,
            "encoding_errors_replaced": stats.encoding_errors_replaced,
            "chars_kept": chars,
            "doc_tokens": sum(per_split[s]["doc_tokens"] for s in SPLITS),
            "tokens_written": sum(splits[s]["tokens"] for s in SPLITS),
            "sequences": sum(splits[s]["samples"] for s in SPLITS),
        },
        "skipped_errors": stats.messages,
        "seconds": round(seconds, 3),
    }
    write_json_atomic(result_path(cfg.work_dir, unit), result)  # the done-marker: LAST
    return result


# --------------------------------------------------------------------------- finalize


def _sum_counts(results: list[dict]) -> dict:
    total: dict = {}
    for r in results:
        for k, v in r["counts"].items():
            if isinstance(v, dict):
                d = total.setdefault(k, {})
                for kk, vv in v.items():
                    d[kk] = d.get(kk, 0) + vv
            else:
                total[k] = total.get(k, 0) + v
    return total


def finalize(cfg, wall_seconds: float | None = None, verify: bool = False) -> Path:
    """Merge the unit results (in unit order) into ``manifest.json``, atomically.

    Refuses, naming them, if some units are unfinished.  Checks that every listed shard
    exists with the recorded size (``verify=True`` re-hashes them too).
    """
    cfg = as_config(cfg)
    units = load_plan(cfg)
    plan_info = _read_plan_file(_plan_file(cfg))
    results, missing = [], []
    for u in units:
        r = read_result(cfg.work_dir, u)
        (missing.append(u.name) if r is None else results.append(r))
    if missing:
        raise DataPipelineError(
            f"{cfg.out}: {len(missing)} of {len(units)} units unfinished ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}); run them (`python -m data_pipeline run-unit "
            f"--out {cfg.out} --all`) and finalize again"
        )
    tok_file = cfg.out / TOKENIZER_NAME
    tok_sha = sha256_file(tok_file)
    splits = {}
    for s in SPLITS:
        shards = []
        for r in results:
            if r["tokenizer_sha256"] != tok_sha:
                raise DataPipelineError(f"unit {r['unit']['name']} was built with another tokenizer")
            for rec in r["splits"][s]["shards"]:
                p = cfg.out / rec["path"]
                if not p.is_file() or p.stat().st_size != rec["bytes"]:
                    raise DataPipelineError(
                        f"{p}: shard missing or of the wrong size; delete "
                        f"{result_path(cfg.work_dir, Unit.from_dict(r['unit']))} and re-run"
                    )
                if verify and sha256_file(p) != rec["sha256"]:
                    raise DataPipelineError(f"{p}: sha256 mismatch; delete the unit's result and re-run")
                shards.append({k: rec[k] for k in ("path", "samples", "tokens", "sha256", "bytes")})
        splits[s] = {
            "shards": shards,
            "samples": sum(x["samples"] for x in shards),
            "tokens": sum(x["tokens"] for x in shards),
            "docs": sum(r["splits"][s]["docs"] for r in results),
        }
    counts = _sum_counts(results)
    unit_seconds = sum(r["seconds"] for r in results)
    report = {
        **counts,
        "units": len(units),
        "unit_seconds": round(unit_seconds, 3),
        "tokens_per_second_per_process": round(counts["doc_tokens"] / unit_seconds, 1) if unit_seconds else None,
    }
    if wall_seconds:
        report["wall_seconds"] = round(wall_seconds, 3)
        report["tokens_per_second"] = round(counts["doc_tokens"] / wall_seconds, 1)
    report["skipped_errors"] = [m for r in results for m in r.get("skipped_errors", [])][:20]
    tok = load_tokenizer(tok_file)
    vocab = tok.get_vocab_size()
    manifest = {
        "format_version": FORMAT_VERSION,
        "block_sequences": cfg.block_sequences,
        "seq_len": cfg.seq_len,
        "vocab_size": vocab,
        "dtype": dtype_for_vocab(vocab),
        "tokenizer": {"file": TOKENIZER_NAME, "sha256": tok_sha},
        "special_ids": special_ids(tok, cfg.special_tokens),
        "packing": cfg.packing,
        "splits": splits,
        "inputs": plan_info["inputs"],
        "config": cfg.output_affecting(),
        "report": report,
    }
    path = cfg.out / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def format_report(report: dict) -> str:
    d = report.get("dropped", {})
    lines = [
        f"documents read     {report.get('docs_read', 0):>14,}",
        f"documents kept     {report.get('docs_kept', 0):>14,}",
        "dropped            " + (", ".join(f"{k}={v:,}" for k, v in d.items() if v) or "none"),
        f"encoding errors    {report.get('encoding_errors_replaced', 0):>14,} (replaced with U+FFFD)",
        f"tokens written     {report.get('tokens_written', 0):>14,} in {report.get('sequences', 0):,} sequences",
        f"units              {report.get('units', 0):>14,}",
    ]
    if report.get("corrupt_files"):
        lines.append(f"corrupt files      {report['corrupt_files']:>14,} (read up to the damage)")
    if report.get("tokens_per_second"):
        lines.append(
            f"throughput         {report['tokens_per_second']:>14,.0f} tokens/s ({report['wall_seconds']:.1f} s wall)"
        )
    elif report.get("tokens_per_second_per_process"):
        lines.append(f"throughput         {report['tokens_per_second_per_process']:>14,.0f} tokens/s per process")
    return "\n".join(lines)


# --------------------------------------------------------------------------- build


def _init_worker(threads: int, parent: int):
    die_with_parent(parent)  # a SIGKILLed build leaves no worker behind
    # Each worker process gets its share of the cores for the tokenizer's own thread pool;
    # with one core each, the pool is switched off to avoid oversubscription.
    os.environ["RAYON_NUM_THREADS"] = str(threads)
    if threads <= 1:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"


def _worker_run(cfg_dict: dict, unit_dict: dict, queue) -> dict:
    cfg = BuildConfig.from_dict(cfg_dict)
    cb = (lambda n: queue.put(n)) if queue is not None else None
    return run_unit(cfg, Unit.from_dict(unit_dict), progress=cb)


def _worker_hash(cfg_dict: dict, unit_dict: dict, queue) -> str:
    unit = Unit.from_dict(unit_dict)
    p = hash_unit(BuildConfig.from_dict(cfg_dict), unit)
    if queue is not None:
        queue.put(unit.est_bytes)
    return str(p)


def build(cfg, workers: int = 1, progress: bool = True, verify: bool = False) -> Path:
    """plan_units + run every unfinished unit on ``workers`` processes + finalize.

    The output does not depend on ``workers``.  Killed at any point and called again with
    the same config, it skips finished units and redoes the others.
    """
    cfg = as_config(cfg)
    if workers < 1:
        raise DataPipelineError(f"workers must be >= 1, got {workers}")
    t0 = time.perf_counter()
    units = plan_units(cfg, progress=progress)
    todo = [u for u in units if read_result(cfg.work_dir, u) is None]
    if cfg.dedup == "global" and todo and not all(dups_path(cfg, u).is_file() for u in units):
        # global dedup needs every unit's hashes before any unit is built
        from .dedup import hashes_path

        to_hash = [u for u in units if not hashes_path(cfg, u).is_file()]
        bar = _bar(progress, total=sum(u.est_bytes for u in to_hash) or None, desc="dedup hashes", unit="B")
        try:
            if workers == 1 or len(to_hash) <= 1:
                for u in to_hash:
                    hash_unit(cfg, u)
                    if bar is not None:
                        bar.update(u.est_bytes)
            else:
                _run_pool(cfg, to_hash, workers, bar.update if bar is not None else None, _worker_hash)
        finally:
            if bar is not None:
                bar.close()
        resolve_duplicates(cfg, units)
    bar = _bar(progress, total=sum(u.est_bytes for u in todo) or None, desc="build", unit="B")
    update = bar.update if bar is not None else None
    try:
        if workers == 1 or len(todo) <= 1:
            for u in todo:
                run_unit(cfg, u, progress=update)
        else:
            _run_pool(cfg, todo, workers, update, _worker_run)
    finally:
        if bar is not None:
            bar.close()
    return finalize(cfg, wall_seconds=time.perf_counter() - t0, verify=verify)


def _run_pool(cfg: BuildConfig, todo: list[Unit], workers: int, update, fn=_worker_run) -> None:
    ctx = mp.get_context("spawn")  # no fork: the parent may hold tokenizer thread pools
    threads = max(1, (os.cpu_count() or 1) // workers)
    manager = None
    if update is not None:
        manager = SyncManager(ctx=ctx)
        manager.start(die_with_parent, (os.getpid(),))
    queue = manager.Queue() if manager is not None else None
    stop = threading.Event()

    def drain():
        while not stop.is_set() or not queue.empty():
            try:
                update(queue.get(timeout=0.2))
            except Exception:
                pass

    drainer = threading.Thread(target=drain, daemon=True) if queue is not None else None
    if drainer is not None:
        drainer.start()
    try:
        with ProcessPoolExecutor(
            max_workers=min(workers, len(todo)),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(threads, os.getpid()),
        ) as ex:
            futs = [ex.submit(fn, cfg.to_dict(), u.to_dict(), queue) for u in todo]
            done, pending = wait(futs, return_when=FIRST_EXCEPTION)
            for f in futs:
                if f.done() and f.exception() is not None:
                    for p in pending:
                        p.cancel()
                    raise f.exception()
    finally:
        stop.set()
        if drainer is not None:
            drainer.join()
        if manager is not None:
            manager.shutdown()
