"""Benchmark: data_pipeline build vs `datasets.Dataset.map(tokenizer, batched=True)` + the same packing; and
the shards on disk and the pretrain loader against what the training step consumes.

    python -m bench.data_pipeline                 # both parts
    python -m bench.data_pipeline --part build    # WikiText-2 repeated to >= 50 MB, 1 and 2 workers
    python -m bench.data_pipeline --part shards   # bytes per token of format 1 and 2, loader vs step
    python -m bench.data_pipeline --mb 5 --quick  # a fast smoke run

build: both sides use the same trained WordPiece tokenizer and the same packer and shard writer,
and one core each for the tokenizer (RAYON_NUM_THREADS=1), so the per-core comparison is fair;
"per core" divides tokens by the CPU seconds of every process involved (parent + workers),
which is also robust to other load on a shared machine.  The baseline gets its documents
already read and stripped in memory; data_pipeline reads, normalises (NFC), hashes and splits
them itself.  Everything runs in one invocation, so the ratios compare like with like.

shards: one build of the corpus per block size (`--blocks`) and its format-1 copy (one tar member per
sequence, as before issue 17): bytes on disk per token (the manifest's non-pad tokens) and against the
raw id bytes (sequences x seq_len x id size); then the pretrain loader as training uses it
(`pretrain.data.TrainBatches`: shard order, chunk shuffle, masking, collate; in the calling process, so
one core), in sequences/s over one epoch, and its first batch as rank 7 of 8 (a stream that starts deep
inside a shard: format 2 skips the blocks before it undecoded); against the sequences/s a training step
(forward + backward + AdamW of `ForMaskedLM`, the `tiny` and `base` presets at the configs' micro-batch
sizes, on this machine's CPU, fp32) consumes, measured in the same run.
"""

from __future__ import annotations

import os

# one tokenizer thread per process on both sides (must be set before tokenizers is imported)
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    cfg = BuildConfig(
        inputs=[str(corpus)],
        out_dir=str(out),
        tokenizer=str(tok_file),
        seq_len=seq_len,
        unit_mb=unit_mb,
        shard_mb=128,
        validation_fraction=0.005,
    )
    c0, t0 = _cpu(), time.perf_counter()
    m = read_manifest(build(cfg, workers=workers, progress=False))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    return {"tokens": m["report"]["doc_tokens"], "wall_s": wall, "cpu_s": cpu, "sequences": m["report"]["sequences"]}


def run_baseline(corpus: Path, tok_file: Path, out: Path, seq_len: int) -> dict:
    import datasets
    from transformers import PreTrainedTokenizerFast

    from data_pipeline.packing import Packer
    from data_pipeline.shards import ShardWriter

    datasets.disable_progress_bars()
    shutil.rmtree(out, ignore_errors=True)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tok_file))
    sp = {k: tok.convert_tokens_to_ids(v) for k, v in {"cls": "[CLS]", "sep": "[SEP]", "pad": "[PAD]"}.items()}
    # not timed: the baseline gets its documents read and stripped, in memory
    lines = [s for s in (line.strip() for line in corpus.read_text(encoding="utf-8").split("\n")) if s]
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


def shard_sizes(manifest: dict) -> dict:
    """Bytes on disk of a build's shards, per token and against the raw ids they hold."""
    shards = [sh for split in manifest["splits"].values() for sh in split["shards"]]
    on_disk = sum(sh["bytes"] for sh in shards)
    tokens = sum(sh["tokens"] for sh in shards)
    id_bytes = sum(sh["samples"] for sh in shards) * manifest["seq_len"] * (2 if manifest["dtype"] == "uint16" else 4)
    return {
        "bytes": on_disk,
        "tokens": tokens,
        "raw_id_bytes": id_bytes,
        "bytes_per_token": on_disk / tokens,
        "x_raw_ids": on_disk / id_bytes,
    }


def loader_speed(manifest: dict, micro_batch: int, max_batches: int) -> dict:
    """The pretrain loader in this process: sequences/s over (up to) one epoch, and seconds to the first
    batch of rank 7 of 8."""
    from pretrain.data import Layout, Masking, TrainBatches

    masking = Masking(manifest["special_ids"], manifest["vocab_size"])
    batches = TrainBatches(manifest, Layout(0, 1, 0, micro_batch), masking, seed=0, shuffle=True, shuffle_shards=2)
    n = min(batches.batches_per_epoch, max_batches)
    t0 = time.perf_counter()
    for _ in range(n):
        next(batches)
    seconds = time.perf_counter() - t0
    late = TrainBatches(manifest, Layout(7, 8, 0, micro_batch), masking, seed=0, shuffle=False, shuffle_shards=2)
    t0 = time.perf_counter()
    next(late)
    return {"sequences_per_s": n * micro_batch / seconds, "first_batch_rank7_of_8_s": time.perf_counter() - t0}


def step_speed(preset: str, micro_batch: int, manifest: dict, steps: int) -> dict:
    """Sequences/s one training step consumes: forward + backward + AdamW on this machine's CPU (fp32),
    on real masked batches of `manifest`."""
    import torch

    from hypermixer import EncoderConfig, ForMaskedLM
    from pretrain.data import Layout, Masking, TrainBatches

    torch.manual_seed(0)
    model = ForMaskedLM(
        EncoderConfig.preset(
            preset, mixer="hypermixer", vocab_size=manifest["vocab_size"], max_seq_len=manifest["seq_len"]
        )
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    masking = Masking(manifest["special_ids"], manifest["vocab_size"])
    batches = TrainBatches(manifest, Layout(0, 1, 0, micro_batch), masking, seed=0, shuffle=False, shuffle_shards=2)
    ready = [next(batches) for _ in range(steps + 1)]  # loaded before the clock starts
    times = []
    for batch in ready:
        t0 = time.perf_counter()
        model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    seconds = float(np.median(times[1:]))  # the first step warms up
    return {
        "micro_batch": micro_batch,
        "step_s": seconds,
        "sequences_per_s": micro_batch / seconds,
        "torch_threads": torch.get_num_threads(),
    }


def run_shards(a, tmp: Path) -> dict:
    from data_pipeline import BuildConfig, build, read_manifest
    from data_pipeline.legacy import write_format1_copy
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    corpus = tmp / "shards_corpus.txt"
    size = make_corpus(a.corpus, a.shards_mb, corpus)
    sample = [line for line in (a.corpus / "valid.txt").read_text(encoding="utf-8").split("\n") if line.strip()]
    tok_file = save_tokenizer(train_tokenizer(sample, vocab_size=a.vocab_size), tmp / "shards_tok")
    builds = {}
    for block in a.blocks:
        cfg = BuildConfig(
            inputs=[str(corpus)],
            out_dir=str(tmp / f"block{block}"),
            tokenizer=str(tok_file),
            seq_len=a.seq_len,
            shard_mb=a.shard_mb,
            block_sequences=block,
            validation_fraction=0.0,
        )
        builds[f"format 2, {block} sequences per member"] = read_manifest(build(cfg, workers=1, progress=False))
    first = next(iter(builds.values()))
    builds = {
        "format 1 (before): one member per sequence": read_manifest(
            write_format1_copy(first["_root"], tmp / "format1")
        ),
        **builds,
    }
    print(
        f"shards: {size / 1e6:.1f} MB of WikiText-2 (repeated), vocab {a.vocab_size}, seq_len {a.seq_len}, "
        f"shards of ~{a.shard_mb} MB (format 2), {first['splits']['train']['samples']:,} sequences; "
        f"cpus {os.cpu_count()}, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    rounds = {name: [] for name in builds}
    for round_ in range(a.rounds):  # interleaved, so that other load on the machine hits every format alike
        for name, m in builds.items():
            rounds[name].append(loader_speed(m, 32, a.loader_batches))
        print(f"  loader round {round_ + 1} of {a.rounds} done", flush=True)
    rows = [
        {
            "shards": name,
            **shard_sizes(m),
            **{k: float(np.median([r[k] for r in rounds[name]])) for k in rounds[name][0]},
            "sequences_per_s_rounds": [r["sequences_per_s"] for r in rounds[name]],
        }
        for name, m in builds.items()
    ]
    # tiny at its config's micro-batch (16); base at 8, not its config's 32: on a CPU the step's sequences/s
    # hardly depends on the micro-batch, and 32 takes over half a minute a step here
    steps = {preset: step_speed(preset, mb, first, a.steps) for preset, mb in (("tiny", 16), ("base", 8))}
    print()
    print(f"loader: medians of {a.rounds} interleaved rounds of {a.loader_batches} micro-batches of 32")
    print(
        "| shards | bytes on disk | tokens | bytes/token | x raw id bytes | loader seq/s (1 core) | "
        "x tiny step | x base step | first batch, rank 7 of 8 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shards']} | {r['bytes']:,} | {r['tokens']:,} | {r['bytes_per_token']:.3f} | "
            f"{r['x_raw_ids']:.3f} | {r['sequences_per_s']:,.0f} | "
            f"{r['sequences_per_s'] / steps['tiny']['sequences_per_s']:.0f} | "
            f"{r['sequences_per_s'] / steps['base']['sequences_per_s']:.0f} | {r['first_batch_rank7_of_8_s']:.3f} |"
        )
    print()
    print("| training step (fp32, CPU, forward + backward + AdamW) | micro-batch | s/step | seq/s | torch threads |")
    print("|---|---|---|---|---|")
    for preset, r in steps.items():
        print(
            f"| {preset} | {r['micro_batch']} | {r['step_s']:.3f} | {r['sequences_per_s']:,.1f} | "
            f"{r['torch_threads']} |"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return {
        "corpus_bytes": size,
        "seq_len": a.seq_len,
        "vocab_size": a.vocab_size,
        "shard_mb": a.shard_mb,
        "cpus": os.cpu_count(),
        "load_average_end": os.getloadavg()[0],
        "rows": rows,
        "steps": steps,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="folder with WikiText-2 valid.txt/test.txt")
    ap.add_argument("--mb", type=float, default=50.0, help="repeat the corpus to at least this many MB")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=16384)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--unit-mb", type=float, default=0.0, help="work unit size (default: corpus / 8)")
    ap.add_argument("--quick", action="store_true", help="5 MB, for a smoke run")
    ap.add_argument("--json", type=Path, help="also write the build part's results here")
    ap.add_argument("--shards-json", type=Path, help="also write the shards part's results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--part", choices=("build", "shards", "all"), default="all")
    ap.add_argument("--shards-mb", type=float, default=10.0, help="shards part: corpus size")
    ap.add_argument("--shard-mb", type=float, default=4.0, help="shards part: shard size (format 2)")
    ap.add_argument("--blocks", type=int, nargs="+", default=[256, 1024], help="shards part: block_sequences")
    ap.add_argument("--loader-batches", type=int, default=400, help="shards part: micro-batches of 32 timed")
    ap.add_argument("--steps", type=int, default=3, help="shards part: training steps timed per preset")
    ap.add_argument("--rounds", type=int, default=3, help="shards part: interleaved loader rounds")
    a = ap.parse_args(argv)
    if a.quick:
        a.mb = min(a.mb, 5.0)
        a.shards_mb, a.loader_batches, a.steps, a.rounds = min(a.shards_mb, 2.0), min(a.loader_batches, 50), 1, 1

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_pipeline_"))
    try:
        if a.part in ("build", "all"):
            build_results = run_build(a, tmp)
            if a.json:
                a.json.write_text(json.dumps(build_results, indent=1))
        if a.part in ("shards", "all"):
            if a.part == "all":
                print()
            shards_results = run_shards(a, tmp)
            if a.shards_json:
                a.shards_json.write_text(json.dumps(shards_results, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")
    return 0


def run_build(a, tmp: Path) -> dict:
    from data_pipeline.tokenizer import save_tokenizer, train_tokenizer

    corpus = tmp / "wikitext2_repeated.txt"
    size = make_corpus(a.corpus, a.mb, corpus)
    unit_mb = a.unit_mb or max(0.5, size / (1 << 20) / 8)
    sample = [line for line in (a.corpus / "valid.txt").read_text(encoding="utf-8").split("\n") if line.strip()]
    tok_file = save_tokenizer(train_tokenizer(sample, vocab_size=a.vocab_size), tmp / "tok")
    print(
        f"corpus: {size / 1e6:.1f} MB ({corpus.name}), WordPiece vocab {a.vocab_size}, seq_len {a.seq_len}, "
        f"units of {unit_mb:.1f} MB, cpus {os.cpu_count()}, RAYON_NUM_THREADS={os.environ['RAYON_NUM_THREADS']}",
        flush=True,
    )
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
    print(
        "| run | processes | tokens | wall s | tokens/s | tokens/s per core (CPU s) | "
        "x baseline per core | x baseline wall |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for name, w, r in rows:
        tps, pc = r["tokens"] / r["wall_s"], r["tokens"] / r["cpu_s"]
        results.append(
            {
                "run": name,
                "processes": w,
                **r,
                "tokens_per_s": tps,
                "tokens_per_cpu_s": pc,
                "ratio_per_core": pc / base_pc,
                "ratio_wall": tps / base_wall,
            }
        )
        print(
            f"| {name} | {w} | {r['tokens']:,} | {r['wall_s']:.1f} | {tps:,.0f} | {pc:,.0f} | "
            f"{pc / base_pc:.2f} | {tps / base_wall:.2f} |"
        )
    if len({r["tokens"] for _, _, r in rows}) != 1:
        print("note: token counts differ (data_pipeline applies NFC normalisation; the baseline does not)")
    return {"corpus_bytes": size, "results": results}


if __name__ == "__main__":
    sys.exit(main())
