"""Benchmark: data_pipeline build vs `datasets.Dataset.map(tokenizer, batched=True)` + the same packing.

    python -m bench.data_pipeline                 # WikiText-2 repeated to >= 50 MB, 1 and 2 workers
    python -m bench.data_pipeline --mb 5 --quick  # a fast smoke run

Both sides use the same trained WordPiece tokenizer and the same packer and shard writer,
and one core each for the tokenizer (RAYON_NUM_THREADS=1), so the per-core comparison is fair;
"per core" divides tokens by the CPU seconds of every process involved (parent + workers),
which is also robust to other load on a shared machine.  The baseline gets its documents
already read and stripped in memory; data_pipeline reads, normalises (NFC), hashes and splits
them itself.  Everything runs in one invocation, so the ratios compare like with like.
"""
from __future__ import annotations

import os

# one tokenizer thread per process on both sides (must be set before tokenizers is imported)
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "corpus" / "wikitext-2"


def _cpu() -> float:
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def make_corpus(src_dir: Path, mb: float, dst: Path) -> int:
    parts = [p.read_bytes() for p in (src_dir / "valid.txt", src_dir / "test.txt") if p.is_file()]
    if not parts:
        sys.exit(f"bench: no WikiText-2 files in {src_dir} (give --corpus DIR with valid.txt/test.txt)")
    chunk = b"".join(parts)
    reps = max(1, int(np.ceil(mb * (1 << 20) / len(chunk))))
    with open(dst, "wb") as f:
        for _ in range(reps):
            f.write(chunk)
    return reps * len(chunk)


def run_pipeline(corpus: Path, tok_file: Path, out: Path, workers: int, seq_len: int, unit_mb: float) -> dict:
    from data_pipeline import BuildConfig, build, read_manifest
    shutil.rmtree(out, ignore_errors=True)
    cfg = BuildConfig(inputs=[str(corpus)], out_dir=str(out), tokenizer=str(tok_file), seq_len=seq_len,
                      unit_mb=unit_mb, shard_mb=128, validation_fraction=0.005)
    c0, t0 = _cpu(), time.perf_counter()
    m = read_manifest(build(cfg, workers=workers, progress=False))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"tokens": m["report"]["doc_tokens"], "wall_s": wall, "cpu_s": cpu,
            "sequences": m["report"]["sequences"]}


def run_baseline(corpus: Path, tok_file: Path, out: Path, seq_len: int) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.packing import Packer
    from data_pipeline.shards import ShardWriter
    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    sp = {k: tok.convert_tokens_to_ids(v) for k, v in
          {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]"}.items()}
    # not timed: the baseline gets its documents read and stripped, in memory
    lines = [s for s in (l.strip() for l in corpus.read_text(encoding="utf-8").split("\n")) if s]
    ds = datasets.Dataset.from_dict({"text": lines})
    del lines
    c0, t0 = _cpu(), time.perf_counter()
    tokd = ds.map(lambda b: tok(b["text"], add_special_tokens=False), batched=True, remove_columns=["text"])
    packer = Packer(seq_len, sp["cls"], sp["sep"], sp["pad"], "concat")
    writer = ShardWriter(out, "train", "baseline", "uint16", seq_len, sp["pad"], 128 << 20)
    n = 0
    for batch in tokd.iter(batch_size=10_000):
        ids = batch["input_ids"]
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter((t for seq in ids for t in seq), dtype=np.uint32, count=int(lengths.sum()))
        n += int(lengths.sum())
        writer.write(packer.add(flat, lengths))
    writer.write(packer.finish())
    writer.close()
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"tokens": n, "wall_s": wall, "cpu_s": cpu}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder with WikiText-2 valid.txt/test.txt")
    ap.add_argument("--mb", type=float, default=50.0, help="repeat the corpus to at least this many MB")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--unit-mb", type=float, default=0.0, help="work unit size (default: corpus / 8)")
    ap.add_argument("--quick", action="store_true", help="5 MB, for a smoke run")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    a = ap.parse_args(argv)
    if a.quick:
        a.mb = min(a.mb, 5.0)

    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer
    tmp = Path(tempfile.mkdtemp(prefix="bench_data_pipeline_"))
    try:
        corpus = tmp / "wikitext2_repeated.txt"
        size = make_corpus(a.corpus, a.mb, corpus)
        unit_mb = a.unit_mb or max(0.5, size / (1 << 20) / 8)
        sample = [l for l in (a.corpus / "valid.txt").read_text(encoding="utf-8").split("\n") if l.strip()]
        tok_file = save_tokenizer(train_tokenizer(sample, vocab_size=a.vocab_size), tmp / "tok")
        print(f"corpus: {size / 1e6:.1f} MB ({corpus.name}), WordPiece vocab {a.vocab_size}, seq_len {a.seq_len}, "
              f"units of {unit_mb:.1f} MB, cpus {os.cpu_count()}, RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}",
              flush=True)
        rows = [("baseline: datasets.map + same packing", 1, run_baseline(corpus, tok_file, tmp / "base", a.seq_len))]
        print(f"  baseline done in {rows[0][2]['wall_s']:.1f} s", flush=True)
        for w in a.workers:
            r = run_pipeline(corpus, tok_file, tmp / f"dp{w}", w, a.seq_len, unit_mb)
            rows.append((f"data_pipeline build --workers {w}", w, r))
            print(f"  data_pipeline --workers {w} done in {r['wall_s']:.1f} s", flush=True)
        base = rows[0][2]
        base_pc = base["tokens"] / base["cpu_s"]
        base_wall = base["tokens"] / base["wall_s"]
        print()
        print("| run | processes | tokens | wall s | tokens/s | tokens/s per core (CPU s) | "
              "x baseline per core | x baseline wall |")
        print("|---|---|---|---|---|---|---|---|")
        results = []
        for name, w, r in rows:
            tps, pc = r["tokens"] / r["wall_s"], r["tokens"] / r["cpu_s"]
            results.append({"run": name, "processes": w, **r, "tokens_per_s": tps, "tokens_per_cpu_s": pc,
                            "ratio_per_core": pc / base_pc, "ratio_wall": tps / base_wall})
            print(f"| {name} | {w} | {r['tokens']:,} | {r['wall_s']:.1f} | {tps:,.0f} | {pc:,.0f} | "
                  f"{pc / base_pc:.2f} | {tps / base_wall:.2f} |")
        if len({r["tokens"] for _, _, r in rows}) != 1:
            print("note: token counts differ (data_pipeline applies NFC normalisation; the baseline does not)")
        if a.json:
            a.json.write_text(json.dumps({"corpus_bytes": size, "results": results}, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
