"""data_pipeline builds: exact token stream, worker independence, kill-and-resume, WikiText-2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from corpora import reference_documents, synthetic_docs, write_lines

from data_pipeline import (
    BuildConfig,
    DataPipelineError,
    build,
    finalize,
    load_config,
    load_plan,
    plan_units,
    read_manifest,
    run_unit,
    shard_urls,
)
from data_pipeline.tokenizer import save_tokenizer, train_tokenizer
from data_pipeline.verify import split_documents, verify_build

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "corpus" / "wikitext-2"


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return save_tokenizer(train_tokenizer(synthetic_docs(1500, seed=11), vocab_size=700, min_frequency=1), d)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two .txt files and a .jsonl file; returns (paths, documents in input order)."""
    d = tmp_path_factory.mktemp("corpus")
    a, b, c = synthetic_docs(900, seed=21), synthetic_docs(500, seed=22), synthetic_docs(400, seed=23)
    write_lines(d / "a.txt", a)
    write_lines(d / "b.txt", b, eol="\r\n")
    (d / "c.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in c), encoding="utf-8")
    return [str(d / "*.txt"), str(d / "c.jsonl")], a + b + c


def _cfg(inputs, out, tok_file, **kw):
    base = dict(
        inputs=inputs,
        out_dir=str(out),
        tokenizer=str(tok_file),
        seq_len=32,
        unit_mb=0.05,
        shard_mb=0.004,
        block_sequences=8,
        validation_fraction=0.2,
        batch_docs=64,
    )
    base.update(kw)
    return BuildConfig(**base)


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for split in ("train", "validation")
        for p in sorted((out / split).glob("*"))
    }


def test_decoded_shards_are_exactly_the_input_token_stream(tmp_path, corpus, tok_file):
    inputs, docs = corpus
    cfg = _cfg(inputs, tmp_path / "out", tok_file)
    m = read_manifest(build(cfg, workers=1, progress=False))
    assert len(load_plan(cfg)) >= 4 and len(m["splits"]["train"]["shards"]) > 4
    assert verify_build(m) == []  # files, hashes, counts and keys match the manifest
    ref = reference_documents(docs, tmp_path / "out" / "tokenizer.json", validation_fraction=0.2)
    for split in ("train", "validation"):
        got = split_documents(m, split)
        assert got == ref[split], split  # same tokens, same order, nothing lost or repeated
        assert m["splits"][split]["docs"] == len(ref[split])
    r = m["report"]
    assert r["docs_read"] == len(docs)
    assert r["docs_kept"] == len(ref["train"]) + len(ref["validation"])
    assert r["docs_read"] - r["docs_kept"] == sum(r["dropped"].values()) and r["dropped"]["empty"] > 0
    assert r["doc_tokens"] == sum(map(len, ref["train"] + ref["validation"]))
    assert r["tokens_written"] == m["splits"]["train"]["tokens"] + m["splits"]["validation"]["tokens"]
    from tokenizers import Tokenizer

    assert m["vocab_size"] == Tokenizer.from_file(str(tok_file)).get_vocab_size()
    assert m["dtype"] == "uint16" and m["special_ids"]["cls"] == 2
    assert m["tokenizer"]["sha256"] and m["inputs"][0]["path"].endswith("a.txt")
    assert all(Path(u).is_absolute() and Path(u).is_file() for u in shard_urls(m, "train"))
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_same_output_with_1_and_2_workers_and_any_unit_order(tmp_path, corpus, tok_file):
    inputs, _ = corpus
    m1 = read_manifest(build(_cfg(inputs, tmp_path / "w1", tok_file), workers=1, progress=False))
    m2 = read_manifest(build(_cfg(inputs, tmp_path / "w2", tok_file), workers=2, progress=False))
    # the SLURM path: plan once, units in reverse order (as array tasks may run), finalize
    cfg3 = _cfg(inputs, tmp_path / "w3", tok_file)
    units = plan_units(cfg3)
    for u in reversed(units):
        run_unit(load_config(cfg3.out_dir), u)
    m3 = read_manifest(finalize(cfg3.out_dir))
    f1 = _files(tmp_path / "w1")
    assert f1 and f1 == _files(tmp_path / "w2") == _files(tmp_path / "w3")
    assert m1["splits"] == m2["splits"] == m3["splits"]


def test_filters_dedup_and_single_packing(tmp_path, tok_file):
    docs = synthetic_docs(700, seed=31, dup_every=5)
    write_lines(tmp_path / "d.txt", docs)
    cfg = _cfg(
        [str(tmp_path / "d.txt")],
        tmp_path / "out",
        tok_file,
        unit_mb=1,
        min_chars=12,
        dedup="unit",
        packing="single",
        seq_len=16,
        validation_fraction=0.1,
    )
    m = read_manifest(build(cfg, progress=False))
    ref = reference_documents(
        docs, tmp_path / "out" / "tokenizer.json", validation_fraction=0.1, min_chars=12, dedup=True
    )
    for split in ("train", "validation"):
        pieces = [d[i : i + 14] for d in ref[split] for i in range(0, len(d), 14)]
        assert split_documents(m, split) == pieces
    d = m["report"]["dropped"]
    assert d["duplicate"] > 50 and d["too_short"] > 0 and d["empty"] > 0
    assert verify_build(m) == []


def _cli(out, inputs, tok_file, env=None, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "data_pipeline",
        "build",
        *inputs,
        "--out",
        str(out),
        "--tokenizer",
        str(tok_file),
        "--seq-len",
        "32",
        "--unit-mb",
        "0.05",
        "--shard-mb",
        "0.004",
        "--block-sequences",
        "8",
        "--validation-fraction",
        "0.2",
        "--batch-docs",
        "64",
        "--no-progress",
        *extra,
    ]
    return cmd, {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}


def test_killed_mid_unit_then_rerun_gives_byte_identical_shards(tmp_path, corpus, tok_file):
    inputs, _ = corpus
    ref = tmp_path / "ref"
    build(_cfg(inputs, ref, tok_file), progress=False)
    out = tmp_path / "out"
    # die by SIGKILL three shards into the second unit: unit 0 is done, unit 1 half-written
    first = json.loads((ref / "_work" / "units" / "u000000.json").read_text())
    kill_after = sum(len(s["shards"]) for s in first["splits"].values()) + 3
    cmd, env = _cli(out, inputs, tok_file, env={"DATA_PIPELINE_TEST_KILL_AFTER_SHARDS": str(kill_after)})
    cmd[1:3] = [str(REPO / "tests" / "crashing_build.py")]  # `python -m data_pipeline` with the kill hook installed
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr  # really killed, by SIGKILL, mid-run
    done = list((out / "_work" / "units").glob("*.json"))
    assert not (out / "manifest.json").exists()
    assert [p.name for p in done] == ["u000000.json"]
    assert len(list(out.glob("*/*.tar"))) == kill_after  # renamed shards of the unfinished unit too
    cmd, env = _cli(out, inputs, tok_file)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(ref)
    m = read_manifest(out)
    assert m["splits"] == read_manifest(ref)["splits"] and verify_build(m) == []


def test_external_sigkill_after_first_unit_then_rerun(tmp_path, corpus, tok_file):
    inputs, _ = corpus
    ref = tmp_path / "ref"
    build(_cfg(inputs, ref, tok_file), progress=False)
    out = tmp_path / "out"
    cmd, env = _cli(out, inputs, tok_file)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker_dir = out / "_work" / "units"
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and not any(marker_dir.glob("*.json")):
        time.sleep(0.002)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the build finished before it could be killed"
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataPipelineError, match="units unfinished"):
        finalize(out)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert _files(out) == _files(ref)


def test_sigkilled_build_leaves_no_worker_behind(tmp_path, corpus, tok_file):
    psutil = pytest.importorskip("psutil")
    inputs, _ = corpus
    cmd, env = _cli(tmp_path / "out", inputs, tok_file, extra=("--workers", "2"))
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: list = []
    deadline = time.time() + 60
    while time.time() < deadline and p.poll() is None and len(children) < 3:  # 2 workers + the manager
        children = psutil.Process(p.pid).children(recursive=True)
        time.sleep(0.05)
    assert p.poll() is None and len(children) >= 3, "the build ended before its workers could be seen"
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    began = time.monotonic()
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive, [c.cmdline() for c in alive]
    print(f"SIGKILL of the build: its {len(children)} child processes were gone {time.monotonic() - began:.1f}s later")


def test_rerun_with_other_settings_is_refused(tmp_path, corpus, tok_file):
    inputs, _ = corpus
    cfg = _cfg(inputs, tmp_path / "out", tok_file)
    build(cfg, progress=False)
    with pytest.raises(DataPipelineError, match="different settings .*seq_len"):
        plan_units(_cfg(inputs, tmp_path / "out", tok_file, seq_len=64))
    before = _files(tmp_path / "out")
    build(cfg, progress=False)  # same settings: everything skipped, same files
    assert _files(tmp_path / "out") == before
    # same settings but the tokenizer file behind --tokenizer changed: refused too
    import shutil

    tok2 = tmp_path / "tok2.json"
    shutil.copyfile(tok_file, tok2)
    build(_cfg(inputs, tmp_path / "out2", tok2), progress=False)
    save_tokenizer(train_tokenizer(synthetic_docs(300, seed=99), vocab_size=100, min_frequency=1), tmp_path / "t")
    shutil.copyfile(tmp_path / "t" / "tokenizer.json", tok2)
    with pytest.raises(DataPipelineError, match="tokenizer changed"):
        build(_cfg(inputs, tmp_path / "out2", tok2), progress=False)


def test_cli_plan_run_unit_finalize_inspect(tmp_path, corpus, tok_file):
    inputs, _ = corpus
    out = tmp_path / "out"
    cmd, env = _cli(out, inputs, tok_file)
    plan_cmd = [c if c != "build" else "plan" for c in cmd]
    run = lambda *a: subprocess.run(
        [sys.executable, "-m", "data_pipeline", *a], env=env, capture_output=True, text=True, timeout=120
    )
    assert subprocess.run(plan_cmd, env=env, capture_output=True, timeout=120).returncode == 0
    r = run("finalize", "--out", str(out))
    assert r.returncode == 2 and "units unfinished" in r.stderr
    n = len(load_plan(out))
    assert run("run-unit", "--out", str(out), "--unit", "0", "1").returncode == 0
    assert run("run-unit", "--out", str(out), "--all").returncode == 0
    r = run("finalize", "--out", str(out), "--verify")
    assert r.returncode == 0 and "tokens written" in r.stdout and "documents read" in r.stdout
    r = run("inspect", str(out), "--verify", "--samples", "2")
    assert r.returncode == 0 and "OK" in r.stdout and "[CLS]" in r.stdout
    ref = tmp_path / "ref"
    build(_cfg(inputs, ref, tok_file), progress=False)
    assert _files(out) == _files(ref) and n >= 4


def test_wikitext2_build_is_exact(tmp_path):
    if not WIKITEXT.is_dir():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT} (../shared is absent); the project does not need it")
    from transformers import PreTrainedTokenizerFast

    src = WIKITEXT / "valid.txt"
    cfg = BuildConfig(
        inputs=[str(src)],
        out_dir=str(tmp_path / "wt"),
        vocab_size=4000,
        seq_len=128,
        unit_mb=0.4,
        shard_mb=0.5,
        validation_fraction=0.05,
    )
    m = read_manifest(build(cfg, workers=1, progress=False))
    assert m["report"]["units"] == 3 and verify_build(m) == []
    docs = src.read_text(encoding="utf-8").split("\n")[:-1]
    ref = reference_documents(docs, tmp_path / "wt" / "tokenizer.json", validation_fraction=0.05)
    for split in ("train", "validation"):
        assert split_documents(m, split) == ref[split]
    assert m["report"]["doc_tokens"] > 200_000
    hf = PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "wt"))
    assert hf.mask_token_id == m["special_ids"]["mask"] and len(hf) == m["vocab_size"]


def test_global_dedup_across_units_and_files(tmp_path, tok_file):
    a = synthetic_docs(600, seed=41)
    b = synthetic_docs(300, seed=42) + a[100:250]  # b repeats part of a
    write_lines(tmp_path / "a.txt", a)
    write_lines(tmp_path / "b.txt", b)
    inputs = [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    cfg = _cfg(inputs, tmp_path / "g1", tok_file, dedup="global")
    m = read_manifest(build(cfg, workers=1, progress=False))
    assert len(load_plan(cfg)) >= 4
    ref = reference_documents(a + b, tmp_path / "g1" / "tokenizer.json", validation_fraction=0.2, dedup=True)
    for split in ("train", "validation"):
        assert split_documents(m, split) == ref[split]
    assert m["report"]["dropped"]["duplicate"] >= 150
    # resolving by hash buckets (bounded memory) gives the same duplicate lists
    import shutil

    import numpy as np

    from data_pipeline import resolve_duplicates

    dups = tmp_path / "g1" / "_work" / "dups"
    before = {p.name: np.load(p) for p in dups.glob("*.npy")}
    assert sum(len(v) for v in before.values()) > 0
    shutil.rmtree(dups)
    resolve_duplicates(cfg, load_plan(cfg), bucket_hashes=7)
    after = {p.name: np.load(p) for p in dups.glob("*.npy")}
    assert before.keys() == after.keys() and all((before[k] == after[k]).all() for k in before)
    m2 = read_manifest(build(_cfg(inputs, tmp_path / "g2", tok_file, dedup="global"), workers=2, progress=False))
    assert _files(tmp_path / "g1") == _files(tmp_path / "g2") and m["splits"] == m2["splits"]
    # distributed steps by CLI: plan, hash-units, resolve-duplicates, run-unit, finalize
    out = tmp_path / "g3"
    cmd, env = _cli(out, inputs, tok_file, extra=("--dedup", "global"))
    run = lambda *x: subprocess.run(
        [sys.executable, "-m", "data_pipeline", *x], env=env, capture_output=True, text=True, timeout=120
    )
    assert subprocess.run([c if c != "build" else "plan" for c in cmd], env=env, timeout=120).returncode == 0
    r = run("run-unit", "--out", str(out), "--unit", "0")
    assert r.returncode == 2 and "dedup=global" in r.stderr
    assert run("hash-units", "--out", str(out), "--all").returncode == 0
    assert run("resolve-duplicates", "--out", str(out)).returncode == 0
    assert run("run-unit", "--out", str(out), "--all").returncode == 0
    assert run("finalize", "--out", str(out)).returncode == 0
    assert _files(out) == _files(tmp_path / "g1")


def test_error_in_a_worker_process_reaches_the_caller(tmp_path, tok_file):
    write_lines(tmp_path / "a.txt", synthetic_docs(200))
    (tmp_path / "b.jsonl").write_bytes(b'{"text": "ok"}\n' * 5 + b'{"text": "ok"\n')
    cfg = _cfg([str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl")], tmp_path / "out", tok_file)
    with pytest.raises(DataPipelineError, match=r"b\.jsonl:6: not valid JSON"):
        build(cfg, workers=2, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
