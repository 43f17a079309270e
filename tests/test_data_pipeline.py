"""data_pipeline: shard format, packing, tokenizer, readers and bad-input errors."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from corpora import synthetic_docs, write_lines

from common.files import write_json_atomic
from data_pipeline import BuildConfig, DataPipelineError
from data_pipeline.packing import Packer, unpack
from data_pipeline.readers import ReadStats, expand_inputs, iter_docs
from data_pipeline.shards import (
    ShardWriter,
    decode_block,
    dtype_for_vocab,
    iter_shard,
    read_manifest,
    read_shard,
)
from data_pipeline.tokenizer import BulkEncoder, load_tokenizer, save_tokenizer, special_ids, train_tokenizer
from data_pipeline.units import plan

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "corpus" / "wikitext-2"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    tok = train_tokenizer(synthetic_docs(800, seed=1), vocab_size=600, min_frequency=1)
    save_tokenizer(tok, d)
    return d


# --------------------------------------------------------------------------- shard format


def _write(tmp, rows, dtype="uint16", seq_len=8, shard_bytes=4096, name="u000000", block_sequences=3, batch=None):
    w = ShardWriter(tmp, "train", name, dtype, seq_len, 0, shard_bytes, block_sequences=block_sequences)
    rows = np.asarray(rows)
    for i in range(0, len(rows), batch or len(rows)):
        w.write(rows[i : i + (batch or len(rows))])
    return w.close()


def test_shards_roundtrip_through_webdataset_and_are_byte_deterministic(tmp_path):
    import webdataset as wds

    rows = np.arange(1, 8 * 13 + 1).reshape(13, 8)
    rows[-1, 5:] = 0  # padding
    recs = _write(tmp_path / "a", rows, shard_bytes=3200)  # 2 blocks of 3 (1 KiB each) per shard, then the last 1
    assert [r["samples"] for r in recs] == [6, 6, 1]
    assert sum(r["tokens"] for r in recs) == 13 * 8 - 3
    urls = [str(tmp_path / "a" / r["path"]) for r in recs]
    samples = list(wds.WebDataset(urls, shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"u000000-{i:08d}" for i in (0, 3, 6, 9, 12)]  # one per block
    got = np.concatenate([decode_block(s, seq_len=8) for s in samples])
    assert got.dtype == np.int64 and (got == rows).all()
    decoded = list(wds.WebDataset(urls, shardshuffle=False).decode())  # webdataset's own .npy decoder
    assert (np.concatenate([s["ids.npy"] for s in decoded]) == rows).all()
    assert [k for u in urls for k, _ in iter_shard(u)] == [f"u000000-{i:08d}" for i in range(13)]
    recs2 = _write(tmp_path / "b", rows, shard_bytes=3200, batch=2)  # other batching, same bytes
    assert [r["sha256"] for r in recs] == [r["sha256"] for r in recs2]
    for r1, r2 in zip(recs, recs2):
        assert (tmp_path / "a" / r1["path"]).read_bytes() == (tmp_path / "b" / r2["path"]).read_bytes()
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_uint32_when_vocab_does_not_fit_16_bits(tmp_path):
    assert dtype_for_vocab(65536) == "uint16" and dtype_for_vocab(65537) == "uint32"
    rows = np.array([[70000, 5, 100000, 0]])
    recs = _write(tmp_path, rows, dtype="uint32", seq_len=4)
    [(key, ids)] = list(iter_shard(tmp_path / recs[0]["path"]))
    assert key == "u000000-00000000" and ids.tolist() == [70000, 5, 100000, 0]


def _npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


@pytest.mark.parametrize(
    "sample, msg",
    [
        ({"__key__": "k", "txt": b"x"}, "expected exactly one of"),
        ({"__key__": "k", "ids.npy": b"not npy at all"}, "not a .npy block"),
        ({"__key__": "k", "ids.npy": _npy(np.zeros((2, 5), "<u2"))}, "expected seq_len=4"),
        ({"__key__": "k", "ids.npy": _npy(np.zeros((2, 4), "<i8"))}, "expected little-endian uint16/uint32"),
        ({"__key__": "k", "ids.npy": _npy(np.zeros((2, 4), "<u2"))[:-3]}, "the header says 2 sequences"),
        ({"__key__": "k", "ids.npy": "text"}, "expected raw bytes"),
        ({"__key__": "k", "ids.u16": b"\x01\x00\x02"}, "not a whole number"),  # format 1 members
        ({"__key__": "k", "ids.u16": b"\x01\x00" * 5}, "expected seq_len=4"),
    ],
)
def test_decode_block_rejects_malformed(sample, msg):
    with pytest.raises(DataPipelineError, match=msg) as caught:
        decode_block(sample, seq_len=4)
    assert "\n" not in str(caught.value)


def test_read_shard_starts_at_any_sample_without_decoding_the_blocks_before(tmp_path):
    rows = np.random.default_rng(0).integers(1, 90, size=(23, 8))
    [rec] = _write(tmp_path, rows, shard_bytes=1 << 20, block_sequences=5)  # blocks of 5, 5, 5, 5, 3
    path = tmp_path / rec["path"]

    def read(start, stop=None, vocab_size=100):
        return np.array(
            list(read_shard(path, seq_len=8, vocab_size=vocab_size, sha256=rec["sha256"], start=start, stop=stop))
        ).reshape(-1, 8)

    for start in range(23):
        for stop in (start + 1, start + 4, 23, None):
            if stop is None or stop <= 23:
                assert (read(start, stop) == rows[start:stop]).all(), (start, stop)
    with pytest.raises(DataPipelineError, match="23 samples, but the manifest says at least 24"):
        read(20, 24)
    # ids of the first block beyond a smaller vocabulary: reading from sample 5 on never decodes that block,
    # so never sees them; from sample 4 on it must decode it, and names the sample
    rows[0, 3] = 95
    [rec] = _write(tmp_path / "b", rows, shard_bytes=1 << 20, block_sequences=5)
    path = tmp_path / "b" / rec["path"]
    assert (np.array(list(read_shard(path, seq_len=8, vocab_size=91, start=5))) == rows[5:]).all()
    with pytest.raises(DataPipelineError, match=r"u000000-00000000.ids.npy' \(sample 0\): id 95 at position 3"):
        list(read_shard(path, seq_len=8, vocab_size=91, start=4))


def test_format_1_shards_are_still_read(tmp_path):
    """Format 1 (one member per sequence) reads through the same functions, `start` included."""
    from data_pipeline.build import build
    from data_pipeline.legacy import write_format1_copy

    write_lines(tmp_path / "c.txt", synthetic_docs(200, seed=3))
    new = read_manifest(
        build(
            BuildConfig(
                inputs=[str(tmp_path / "c.txt")],
                out_dir=str(tmp_path / "v2"),
                vocab_size=80,
                min_frequency=1,
                seq_len=16,
                shard_mb=0.002,
                block_sequences=8,
                validation_fraction=0.0,
            ),
            progress=False,
        )
    )
    old = read_manifest(write_format1_copy(tmp_path / "v2", tmp_path / "v1"))
    assert (new["format_version"], new["block_sequences"], old["format_version"]) == (2, 8, 1)
    for rec_new, rec_old in zip(new["splits"]["train"]["shards"], old["splits"]["train"]["shards"]):
        for start in (0, 3, rec_new["samples"] - 1):
            a = list(
                read_shard(
                    Path(new["_root"]) / rec_new["path"],
                    seq_len=16,
                    vocab_size=80,
                    sha256=rec_new["sha256"],
                    start=start,
                )
            )
            b = list(
                read_shard(
                    Path(old["_root"]) / rec_old["path"],
                    seq_len=16,
                    vocab_size=80,
                    sha256=rec_old["sha256"],
                    start=start,
                )
            )
            assert len(a) == rec_new["samples"] - start and (np.array(a) == np.array(b)).all()
    from data_pipeline.verify import verify_build

    assert verify_build(old) == [] and verify_build(new) == []


def test_a_newer_format_is_refused_with_one_line_saying_to_rebuild(tmp_path):
    write_json_atomic(tmp_path / "manifest.json", {"format_version": 3})
    with pytest.raises(DataPipelineError) as caught:
        read_manifest(tmp_path)
    line = str(caught.value)
    assert "\n" not in line and "format_version is 3" in line and "python -m data_pipeline build" in line


def test_read_manifest_errors(tmp_path):
    with pytest.raises(DataPipelineError, match="manifest not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataPipelineError, match="corrupt manifest"):
        read_manifest(tmp_path)
    write_json_atomic(tmp_path / "manifest.json", {"format_version": 1, "seq_len": 8})
    with pytest.raises(DataPipelineError, match="invalid manifest"):
        read_manifest(tmp_path / "manifest.json")


# --------------------------------------------------------------------------- packing


@pytest.mark.parametrize("mode", ["concat", "single"])
@pytest.mark.parametrize("seq_len", [3, 4, 9, 64])
def test_packing_roundtrip_any_batching(mode, seq_len):
    rng = np.random.default_rng(seq_len)
    docs = [rng.integers(5, 1000, size=int(rng.integers(1, 200))).tolist() for _ in range(120)]
    p = Packer(seq_len, cls_id=2, sep_id=3, pad_id=0, mode=mode)
    out, i = [], 0
    while i < len(docs):
        b = docs[i : i + int(rng.integers(1, 20))]
        i += len(b)
        out.append(p.add(np.array([t for d in b for t in d], dtype=np.uint32), np.array([len(d) for d in b])))
    out.append(p.finish())
    seqs = np.concatenate(out)
    assert seqs.shape[1] == seq_len and (seqs[:, 0] == 2).all()
    body = seq_len - 2
    expected = docs if mode == "concat" else [d[j : j + body] for d in docs for j in range(0, len(d), body)]
    assert unpack(seqs, 2, 3, 0, mode) == expected
    if mode == "concat":  # no waste: only the last sequence has padding
        assert (seqs[:-1] != 0).all()


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_trained_tokenizer_loads_in_tokenizers_and_transformers(tmp_path, kind):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = train_tokenizer(synthetic_docs(400), kind=kind, vocab_size=300, min_frequency=1, lowercase=True)
    path = save_tokenizer(tok, tmp_path)
    assert special_ids(tok) == {"pad": 0, "unk": 1, "cls": 2, "sep": 3, "mask": 4}
    t1 = Tokenizer.from_file(str(path))
    text = "The Lobster river"
    ids = t1.encode(text).ids
    assert ids[0] == 2 and ids[-1] == 3 and len(ids) > 2
    t2 = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert t2(text)["input_ids"] == ids
    t3 = AutoTokenizer.from_pretrained(str(tmp_path))
    assert t3(text)["input_ids"] == ids and t3.pad_token_id == 0 and t3.mask_token == "[MASK]"
    assert t1.encode("the lobster").ids == t1.encode("THE LOBSTER").ids  # lowercasing
    # the bulk encoder (fast path or not) gives exactly the per-document ids
    texts = synthetic_docs(200, seed=9)
    flat, lengths = BulkEncoder(tok).encode(texts)
    t1.encode_special_tokens = True
    assert flat.tolist() == [i for t in texts for i in t1.encode(t, add_special_tokens=False).ids]


def test_cli_train_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    src = write_lines(tmp_path / "c.txt", synthetic_docs(300))
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline",
            "train-tokenizer",
            str(src),
            "--out",
            str(tmp_path / "tok"),
            "--vocab-size",
            "200",
            "--min-frequency",
            "1",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert hf.cls_token_id == 2 and hf("the river")["input_ids"][-1] == 3


def test_bulk_encoder_matches_per_document_encoding(tok_dir):
    tok = load_tokenizer(tok_dir)
    enc = BulkEncoder(tok)
    assert enc.fast is not None  # BERT-style: the ASCII fast path is on
    ref = load_tokenizer(tok_dir)
    ref.encode_special_tokens = True
    texts = synthetic_docs(600, seed=5) + ["A\tB\r\nC\x0bD\x00E\x7fF", "[SEP] [MASK]", "ÀÉÎ Ünïcödé", "x"]
    flat, lengths = enc.encode(texts)
    expected = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    # special-token text is plain text, never the special id
    f2, _ = enc.encode(["a [SEP] b"])
    assert 3 not in f2.tolist()


def test_bulk_encoder_matches_on_wikitext(tok_dir):
    if not WIKITEXT.is_dir():
        pytest.skip(f"WikiText-2 not found at {WIKITEXT} (../shared is absent)")
    tok = train_tokenizer((line for line in (WIKITEXT / "valid.txt").open(encoding="utf-8")), vocab_size=3000)
    enc = BulkEncoder(tok)
    tok.encode_special_tokens = True
    lines = [line.strip() for line in (WIKITEXT / "test.txt").open(encoding="utf-8") if line.strip()]
    flat, lengths = enc.encode(lines)
    expected = [tok.encode(t, add_special_tokens=False).ids for t in lines]
    assert flat.tolist() == [i for e in expected for i in e]
    assert any(not t.isascii() for t in lines) and any(t.isascii() for t in lines)  # both paths taken


# --------------------------------------------------------------------------- readers


def _read_units(cfg, unit_mb):
    units = plan(expand_inputs(cfg.inputs), unit_mb)
    out, stats = [], ReadStats()
    for u in units:
        out.extend(iter_docs(u, cfg, stats))
    return units, out, stats


@pytest.mark.parametrize("eol", ["\n", "\r\n"])
@pytest.mark.parametrize("unit_mb", [0.0004, 0.001, 0.003, 1.0])
def test_txt_line_byte_ranges_lose_and_repeat_nothing(tmp_path, eol, unit_mb):
    docs = synthetic_docs(300, seed=2)
    f = write_lines(tmp_path / "c.txt", docs, eol)
    cfg = BuildConfig(inputs=[str(f)], out_dir=str(tmp_path / "o"))
    units, got, stats = _read_units(cfg, unit_mb)
    assert (len(units) > 1) == (unit_mb < 1)
    assert got == docs and stats.docs_read == len(docs)


@pytest.mark.parametrize("unit_mb", [0.0003, 0.001, 0.004, 1.0])
def test_txt_block_byte_ranges_lose_and_repeat_nothing(tmp_path, unit_mb):
    rng = np.random.default_rng(0)
    docs = synthetic_docs(200, seed=3, empty_every=0)
    blocks = ["\n".join(docs[i : i + k]) for i, k in zip(range(0, 200, 3), rng.integers(1, 4, 67))]
    seps = ["\n\n", "\n\n\n", "\n  \n", "\n\t\n\n"]
    text = "\n\n" + "".join(b + seps[i % 4] for i, b in enumerate(blocks))
    f = tmp_path / "b.txt"
    f.write_text(text, encoding="utf-8")
    cfg = BuildConfig(inputs=[str(f)], out_dir=str(tmp_path / "o"), txt_mode="block")
    units, got, _ = _read_units(cfg, unit_mb)
    assert got == blocks


def test_jsonl_plain_gz_zst_parquet_and_datasets_inputs(tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs = [d for d in synthetic_docs(240, seed=4)]
    lines = [json.dumps({"id": i, "body": d}) for i, d in enumerate(docs)]
    raw = ("\n".join(lines) + "\n").encode()
    (tmp_path / "a.jsonl").write_bytes(raw)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw))
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet", row_group_size=50)
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"body": docs[:10]})}).save_to_disk(
        str(tmp_path / "saved_dict")
    )
    hub_dir = tmp_path / "hubdir"
    hub_dir.mkdir()
    (hub_dir / "train-0.jsonl").write_bytes(("\n".join(lines[:100]) + "\n").encode())
    (hub_dir / "train-1.jsonl").write_bytes(("\n".join(lines[100:]) + "\n").encode())
    for spec, expect, unit_mb in [
        (str(tmp_path / "a.jsonl"), docs, 0.002),
        (str(tmp_path / "b.jsonl.gz"), docs, 0.002),
        (str(tmp_path / "c.jsonl.zst"), docs, 0.002),
        (str(tmp_path / "d.parquet"), docs, 0.001),
        (str(tmp_path / "saved"), docs, 0.001),
        (str(tmp_path / "saved_dict") + "@validation", docs[:10], 1),
        (str(tmp_path / "*.jsonl*"), docs * 3, 1),
        # the hub code path (load_dataset(..., streaming=True) + shard units) on a local folder
        ("hf:" + str(hub_dir), docs, 1),
    ]:
        cfg = BuildConfig(inputs=[spec], out_dir=str(tmp_path / "o"), text_field="body")
        units, got, _ = _read_units(cfg, unit_mb)
        assert got == expect, spec
        if spec.endswith(("a.jsonl", ".parquet", "saved")) or spec.startswith("hf:"):
            assert len(units) > 1, spec


# --------------------------------------------------------------------------- bad input


def _bad(tmp_path, name, data, **kw):
    p = tmp_path / name
    p.write_bytes(data)
    cfg = BuildConfig(inputs=[str(p)], out_dir=str(tmp_path / "o"), **kw)
    units, stats = plan(expand_inputs(cfg.inputs), 1), ReadStats()
    return p, [d for u in units for d in iter_docs(u, cfg, stats)], stats


def test_bad_jsonl_records_name_file_and_line(tmp_path):
    good = b'{"text": "fine"}\n'
    cases = [
        (b'{"text": "a"}\n{oops\n', 2, "not valid JSON"),
        (good + good + b'{"body": "x"}\n', 3, "no field 'text'"),
        (good + b'{"text": 5}\n', 2, "field 'text' is int, not a string"),
        (good + b"[1, 2]\n", 2, "not a JSON object"),
    ]
    for data, line, msg in cases:
        with pytest.raises(DataPipelineError, match=rf"bad\.jsonl:{line}: {msg}"):
            _bad(tmp_path, "bad.jsonl", data)
        _, docs, stats = _bad(tmp_path, "bad.jsonl", data, on_error="skip")
        assert stats.bad_records == 1 and "bad.jsonl" in stats.messages[0]


def test_corrupt_compressed_files(tmp_path):
    import zstandard

    raw = b"".join(b'{"text": "doc %d"}\n' % i for i in range(5000))
    gz = gzip.compress(raw)
    with pytest.raises(DataPipelineError, match=r"bad\.jsonl\.gz:\d+: corrupt or truncated"):
        _bad(tmp_path, "bad.jsonl.gz", gz[: len(gz) // 2])
    with pytest.raises(DataPipelineError, match=r"bad2\.jsonl\.gz:1: corrupt"):
        _bad(tmp_path, "bad2.jsonl.gz", b"this is not gzip at all")
    zs = zstandard.ZstdCompressor().compress(raw)
    with pytest.raises(DataPipelineError, match=r"bad\.jsonl\.zst:\d+: corrupt.*truncated"):
        _bad(tmp_path, "bad.jsonl.zst", zs + zs[: len(zs) // 2])  # second frame cut short
    zs = zstandard.ZstdCompressor(write_checksum=True).compress(raw)  # as the zstd tool writes
    with pytest.raises(DataPipelineError, match=r"bad\.jsonl\.zst:\d+: corrupt"):
        _bad(tmp_path, "bad.jsonl.zst", zs[:100] + b"\xff" * 50 + zs[150:])
    _, docs, stats = _bad(tmp_path, "bad.jsonl.gz", gz[: len(gz) // 2], on_error="skip")
    assert stats.corrupt_files == 1 and 0 < len(docs) < 5000
    assert docs == [f"doc {i}" for i in range(len(docs))]  # kept what came before the damage


def test_jsonl_with_byte_order_mark(tmp_path):
    _, docs, _ = _bad(tmp_path, "bom.jsonl", b'\xef\xbb\xbf{"text": "a"}\n{"text": "b"}\n')
    assert docs == ["a", "b"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    _, docs, stats = _bad(tmp_path, "enc.txt", b"caf\xe9 ok\nfine\n\xff\xfe bad\n")
    assert docs == ["caf\ufffd ok", "fine", "\ufffd\ufffd bad"] and stats.encoding_errors_replaced == 2
    _, docs, stats = _bad(tmp_path, "enc.jsonl", b'{"text": "caf\xe9"}\n')
    assert docs == ["caf\ufffd"] and stats.encoding_errors_replaced == 1


def test_missing_paths_and_unknown_types(tmp_path):
    with pytest.raises(DataPipelineError, match="nope.txt: no such file"):
        expand_inputs([str(tmp_path / "nope.txt")])
    with pytest.raises(DataPipelineError, match="glob matches no file"):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataPipelineError, match="unsupported input type"):
        expand_inputs([str(tmp_path / "x.csv")])
    with pytest.raises(DataPipelineError, match="not a datasets save_to_disk folder"):
        expand_inputs([str(tmp_path)])
    with pytest.raises(DataPipelineError, match="invalid config: packing"):
        BuildConfig(inputs=["x"], out_dir="o", packing="zigzag")


def test_cli_errors_are_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": \n')
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_pipeline",
            "build",
            str(bad),
            "--out",
            str(tmp_path / "o"),
            "--vocab-size",
            "100",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("data_pipeline: error: ") and "bad.jsonl:2: not valid JSON" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "data_pipeline", "finalize", "--out", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "config not found" in r.stderr


def test_cli_help_for_every_subcommand():
    from data_pipeline.__main__ import make_parser

    p = make_parser()
    sub = next(a for a in p._actions if a.dest == "cmd")
    assert set(sub.choices) == {
        "build",
        "plan",
        "run-unit",
        "finalize",
        "train-tokenizer",
        "inspect",
        "hash-units",
        "resolve-duplicates",
    }
    for sp in sub.choices.values():
        assert sp.format_help().startswith("usage:")
    r = subprocess.run([sys.executable, "-m", "data_pipeline", "build", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--workers" in r.stdout and "--on-error" in r.stdout


def test_bulk_encoder_fast_path_is_exact_for_every_bmp_character(tok_dir):
    """Each assigned BMP character, alone and between words, through the fast path and
    through the tokenizer's own normalizer, gives the same ids."""
    import unicodedata

    tok = load_tokenizer(tok_dir)
    enc = BulkEncoder(tok)
    ref = load_tokenizer(tok_dir)
    ref.encode_special_tokens = True
    chars = [chr(c) for c in range(0x80, 0x10000) if unicodedata.category(chr(c)) not in ("Cs",)]
    texts = [f"The{c}x {c}Ab {c}{c}" for c in chars] + ["".join(chars[i : i + 50]) for i in range(0, len(chars), 50)]
    flat, lengths = enc.encode(texts)
    expected = [ref.encode(t, add_special_tokens=False).ids for t in texts]
    assert lengths.tolist() == [len(e) for e in expected]
    assert flat.tolist() == [i for e in expected for i in e]
    assert len(enc.charmap) > 60000  # the table really was used, not the ordinary path
