"""Corrupt shards are caught by the training loader with one line naming the shard, before any batch of
the chunk holding the corrupt sample is handed out: a 1-bit flip (a valid id: only the sha256 sees it)
and a 16-byte flip (ids outside the vocabulary), on real tar shards read by the real DataLoader."""

from __future__ import annotations

import shutil

import pytest
from test_pretrain_data import corpus

from data_pipeline.build import build
from data_pipeline.config import BuildConfig
from data_pipeline.errors import DataPipelineError
from data_pipeline.shards import read_manifest
from pretrain.data import Layout, Masking, TrainBatches

HEADER = 512  # a tar member's header; the member's data (a .npy block) follows it


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    (root / "corpus.txt").write_text(corpus(600))
    return build(
        BuildConfig(
            inputs=[str(root / "corpus.txt")],
            out_dir=str(root / "out"),
            vocab_size=100,
            seq_len=16,
            shard_mb=0.004,
            block_sequences=8,
            validation_fraction=0.1,
        ),
        workers=1,
        progress=False,
    ).parent


def corrupted(clean, tmp_path, flip) -> tuple[dict, str]:
    out = tmp_path / "out"
    shutil.copytree(clean, out)
    manifest = read_manifest(out)
    shard = out / manifest["splits"]["train"]["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    # the shard's first member is a block of 8 sequences: tar header, .npy header (magic, version, its length,
    # the dict), then 8 x 16 uint16 ids; the ids of the 4th sample (index 3) start 3 x 32 bytes in
    npy_header = 10 + int.from_bytes(data[HEADER + 8 : HEADER + 10], "little")
    start = HEADER + npy_header + 3 * 16 * 2
    flip(data, start)
    shard.write_bytes(bytes(data))
    return manifest, str(shard)


def all_batches(manifest, workers, got=None):
    masking = Masking(manifest["special_ids"], manifest["vocab_size"])
    batches = TrainBatches(manifest, Layout(0, 1, workers, 4), masking, seed=0, shuffle=False, shuffle_shards=2)
    got = [] if got is None else got
    for _ in range(batches.batches_per_epoch):
        got.append(next(batches))
    return got


def one_bit(data, start):
    data[start + 2] ^= 0x01  # lowest bit of the 2nd id: still inside the vocabulary


def sixteen_bytes(data, start):
    for i in range(16):
        data[start + i] ^= 0xFF


@pytest.mark.parametrize("flip,expected", [(one_bit, "sha256"), (sixteen_bytes, "outside the vocabulary")])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_flipped_shard_stops_the_loader_with_one_line(clean, tmp_path, flip, expected, workers):
    manifest, shard = corrupted(clean, tmp_path, flip)
    got = []
    with pytest.raises(DataPipelineError) as caught:
        all_batches(manifest, workers, got)
    if workers == 0:  # shards 0 and 1 are the first chunk: not one batch of it may come out
        assert got == []
    line = str(caught.value).strip().splitlines()[-1]  # a DataLoader worker's error comes wrapped
    assert shard in line and expected in line and "rebuild or restore it" in line, line
    if flip is sixteen_bytes:
        assert "sample 3" in line and ".ids.npy" in line, line
    print(f"{flip.__name__}: {line}")


def test_without_corruption_every_batch_comes(clean, tmp_path):
    manifest = read_manifest(clean)
    assert len(all_batches(manifest, 0)) > 0
