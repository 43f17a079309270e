"""pretrain.data: one global order for every layout (each sample once an epoch, exact resume on any layout),
the streams (disjoint, balanced) and the masking."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
import torch

from data_pipeline.build import build
from data_pipeline.config import BuildConfig
from data_pipeline.shards import read_manifest
from hypermixer import IGNORE_INDEX
from pretrain.data import (
    Cursor,
    Layout,
    Masking,
    TrainBatches,
    global_order,
    shards_of,
    stream_pieces,
    validation_batches,
    validation_samples,
)

NOUNS = "cat dog bird fish horse cow sheep mouse lion tiger bear wolf fox deer".split()
VERBS = "sees chases likes follows finds watches hears feeds".split()
ADJECTIVES = "big small red old young quick lazy happy".split()


def corpus(lines: int, seed: int = 0) -> str:
    """Template sentences: a small language with structure a masked LM can learn."""
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = []
        for _ in range(rng.randint(1, 4)):
            words += [
                "the",
                rng.choice(ADJECTIVES),
                rng.choice(NOUNS),
                rng.choice(VERBS),
                "the",
                rng.choice(NOUNS),
                ".",
            ]
        out.append(" ".join(words))
    return "\n".join(out) + "\n"


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    (root / "corpus.txt").write_text(corpus(1500))
    path = build(
        BuildConfig(
            inputs=[str(root / "corpus.txt")],
            out_dir=str(root / "out"),
            vocab_size=100,
            seq_len=16,
            shard_mb=0.006,
            block_sequences=16,
            validation_fraction=0.1,
        ),
        workers=1,
        progress=False,
    )
    return read_manifest(path)


@pytest.fixture(scope="module")
def masking(manifest):
    return Masking(manifest["special_ids"], manifest["vocab_size"])


def test_fixture_has_uneven_shards(manifest):
    counts = [s.samples for s in shards_of(manifest, "train")]
    assert len(counts) >= 5 and len(set(counts)) > 1  # a last, shorter shard: balance is not free


@pytest.mark.parametrize("streams", [1, 4, 6, 16])
def test_streams_are_disjoint_balanced_and_cover_the_epoch(manifest, streams):
    shards = shards_of(manifest, "train")
    total = sum(s.samples for s in shards)
    layout = Layout(0, 1, 0, micro_batch_size=4, streams=streams)
    for epoch in (0, 1):
        seen = Counter()
        for stream in range(streams):
            pieces = stream_pieces(shards, layout, stream, seed=3, epoch=epoch, shuffle=True)
            assert sum(p.size for p in pieces) == total // streams  # every stream the same size
            seen.update((p.shard.index, i) for p in pieces for i in range(p.start, p.stop))
        assert max(seen.values()) == 1  # disjoint
        assert len(seen) == total - total % streams  # only the remainder is left out


def served(
    manifest,
    masking,
    world_size: int,
    workers: int,
    micro_batches: int,
    cursor: Cursor | None = None,
    streams: int = 16,
) -> list[dict[str, torch.Tensor]]:
    """What `world_size` ranks with `workers` loader workers each train on, as global micro-batches in order
    (micro-step i of rank r is global micro-batch i x world_size + r), each with its `sample_ids`."""
    ranks = [
        TrainBatches(
            manifest,
            Layout(rank, world_size, workers, 4, streams),
            masking,
            seed=5,
            shuffle=True,
            shuffle_shards=2,
            cursor=cursor,
            record_ids=True,
        )
        for rank in range(world_size)
    ]
    out = []
    for _ in range(micro_batches // world_size):
        for batches in ranks:
            batch = next(batches)
            out.append({**batch, "sample_ids": batches.taken_ids.pop()})
    for batches in ranks:
        batches.close()
    return out


def rows(micro_batches) -> list[tuple[int, int]]:
    return [tuple(row) for mb in micro_batches for row in (mb.tolist() if torch.is_tensor(mb) else mb)]


LAYOUTS = [(1, 0), (1, 2), (2, 2), (4, 1), (8, 0), (16, 0)]  # (world size, workers): all divide 16


@pytest.mark.parametrize("world_size,workers", LAYOUTS)
def test_every_layout_trains_on_the_same_global_order_once_per_epoch(manifest, masking, world_size, workers):
    shards = shards_of(manifest, "train")
    layout = Layout(0, world_size, workers, 4, streams=16)
    epochs = [global_order(shards, layout, 5, epoch, True, 2) for epoch in (0, 1)]
    assert epochs == [global_order(shards, Layout(0, 1, 0, 4, 16), 5, e, True, 2) for e in (0, 1)]  # pure
    per_epoch = len(epochs[0])
    assert per_epoch == layout.global_batches_per_epoch(sum(s.samples for s in shards))
    got = served(manifest, masking, world_size, workers, per_epoch + 16)  # into the next epoch
    assert rows(b["sample_ids"] for b in got) == rows(epochs[0] + epochs[1][:16])
    epoch0 = rows(epochs[0])
    assert len(epoch0) == len(set(epoch0))  # every sample at most once an epoch
    total = sum(s.samples for s in shards)
    assert total - len(epoch0) < 16 * 4 + 16  # what is dropped: < one micro-batch and one sample per stream


def test_layouts_give_identical_batches_and_masks(manifest, masking):
    one = served(manifest, masking, 1, 0, 48)
    for world_size, workers in ((2, 2), (4, 1)):
        other = served(manifest, masking, world_size, workers, 48)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(one, other) for k in a)


def test_more_streams_than_shards_still_gives_every_rank_data(manifest, masking):
    shards = shards_of(manifest, "train")
    world_size = streams = len(shards) + 4  # a rank per shard and more: per-node shard splitting would starve some
    counts = []
    for rank in range(world_size):
        layout = Layout(rank, world_size, 0, micro_batch_size=2, streams=streams)
        batches = TrainBatches(manifest, layout, masking, seed=0, shuffle=True, shuffle_shards=1)
        counts.append(sum(1 for _ in range(batches.batches_per_epoch) if next(batches) is not None))
        assert batches.cursor == Cursor(0, batches.batches_per_epoch * world_size)
        next(batches)
        assert batches.cursor == Cursor(1, world_size)  # the next epoch begins where the last one ended
        batches.close()
    assert len(set(counts)) == 1 and counts[0] > 0


def test_too_few_samples_is_an_error_not_a_hang(manifest, masking):
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        TrainBatches(manifest, Layout(0, 2, 2, micro_batch_size=10_000), masking, 0, True, 1)


def test_a_layout_that_does_not_divide_the_streams_is_refused(manifest, masking):
    with pytest.raises(
        ValueError,
        match=r"^data.streams \(16\) must be a multiple of world size x loader workers "
        r"\(3 x 2 = 6\)$",
    ):
        TrainBatches(manifest, Layout(0, 3, 2, micro_batch_size=4), masking, 0, True, 1)


def take(batches: TrainBatches, n: int) -> list[dict[str, torch.Tensor]]:
    out = [next(batches) for _ in range(n)]
    batches.close()
    return out


def test_resume_on_any_layout_continues_the_same_global_stream(manifest, masking):
    per_epoch = Layout(0, 1, 0, 4).global_batches_per_epoch(sum(s.samples for s in shards_of(manifest, "train")))
    expected = served(manifest, masking, 1, 0, per_epoch + 24)  # the uninterrupted run, on one rank
    # written by any layout (the cursor is global), resumed on another: mid-chunk, the epoch's end, the next epoch
    for consumed in (8, 12, per_epoch, per_epoch + 8):
        for world_size, workers in ((2, 2), (4, 1), (1, 2)):
            cursor = Cursor(*divmod(consumed, per_epoch))
            resumed = served(manifest, masking, world_size, workers, 8, cursor)
            for got, want in zip(resumed, expected[consumed : consumed + 8]):
                assert all(torch.equal(got[k], want[k]) for k in want), f"resume at {consumed} on {world_size} differs"


def test_format_1_shards_give_the_same_batches_as_format_2(manifest, masking, tmp_path):
    """The same build as format 1 (one tar member per sequence) trains on exactly the same batches; the
    streams' pieces start inside blocks (format 2 seeks to them) as well as at block starts."""
    from data_pipeline.legacy import write_format1_copy

    old = read_manifest(write_format1_copy(manifest["_root"], tmp_path / "format1"))
    assert (manifest["format_version"], old["format_version"]) == (2, 1)
    layout = Layout(1, 2, 0, micro_batch_size=4)
    starts = {
        p.start % manifest["block_sequences"]
        for stream in range(layout.streams)
        for p in stream_pieces(shards_of(manifest, "train"), layout, stream, seed=5, epoch=0, shuffle=True)
    }
    assert 0 in starts and len(starts) > 1
    a = TrainBatches(manifest, layout, masking, seed=5, shuffle=True, shuffle_shards=2)
    b = TrainBatches(old, layout, masking, seed=5, shuffle=True, shuffle_shards=2)
    for got, want in zip(take(b, a.batches_per_epoch + 2), take(a, a.batches_per_epoch + 2)):
        assert all(torch.equal(got[k], want[k]) for k in want)


def test_epochs_differ_in_order_and_masks(manifest, masking):
    batches = TrainBatches(manifest, Layout(0, 1, 0, 8), masking, seed=1, shuffle=True, shuffle_shards=2)
    first = take(batches, batches.batches_per_epoch + 1)
    again = TrainBatches(
        manifest, Layout(0, 1, 0, 8), masking, seed=1, shuffle=True, shuffle_shards=2, cursor=Cursor(1, 0)
    )
    second_epoch = next(again)
    again.close()
    assert torch.equal(second_epoch["input_ids"], first[-1]["input_ids"])
    assert not torch.equal(first[0]["input_ids"], second_epoch["input_ids"])
    other_seed = take(TrainBatches(manifest, Layout(0, 1, 0, 8), masking, 2, True, 2), 1)[0]
    assert not torch.equal(first[0]["input_ids"], other_seed["input_ids"])


def test_masking_rates_and_what_is_never_masked(manifest, masking):
    rng = np.random.default_rng(0)
    specials = set(manifest["special_ids"].values())
    ids = rng.integers(0, manifest["vocab_size"], size=200_000)
    ids[::7] = manifest["special_ids"]["pad"]
    ids[3::11] = manifest["special_ids"]["sep"]
    inputs, labels = masking(ids, rng)
    selected = labels != IGNORE_INDEX
    eligible = ~np.isin(ids, list(specials))
    assert not selected[~eligible].any()  # padding and special tokens are never targets
    assert np.array_equal(labels[selected], ids[selected])
    assert np.array_equal(inputs[~selected], ids[~selected])
    assert selected.sum() / eligible.sum() == pytest.approx(0.15, abs=0.005)
    as_mask = inputs[selected] == manifest["special_ids"]["mask"]
    unchanged = inputs[selected] == ids[selected]
    assert as_mask.mean() == pytest.approx(0.8, abs=0.01)
    assert (~as_mask & ~unchanged).mean() == pytest.approx(0.1, abs=0.01)  # random replacements (a few hit the same id)
    assert not np.isin(inputs[selected & (inputs != manifest["special_ids"]["mask"])], list(specials)).any()


def test_batches_carry_attention_mask_and_labels(manifest, masking):
    batch = take(TrainBatches(manifest, Layout(0, 1, 0, 8), masking, 0, False, 1), 1)[0]
    assert batch["input_ids"].shape == (8, manifest["seq_len"]) and batch["input_ids"].dtype == torch.int64
    assert torch.equal(batch["attention_mask"], (batch["input_ids"] != manifest["special_ids"]["pad"]).long())
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_validation_is_fixed_and_split_evenly_over_ranks(manifest, masking):
    def rows(rank, world, max_samples=None):
        return torch.cat(
            [
                b["input_ids"]
                for b in validation_batches(manifest, "validation", masking, 0, rank, world, 5, max_samples)
            ]
        )

    whole = rows(0, 1)
    assert torch.equal(whole, rows(0, 1))  # the same sequences and masks at every evaluation
    halves = [rows(r, 2) for r in range(2)]
    assert len(halves[0]) == len(halves[1]) == validation_samples(manifest, "validation", 2, None)
    assert torch.equal(torch.cat(halves), whole[: 2 * len(halves[0])])  # masks do not depend on the world size
    assert len(rows(0, 1, max_samples=7)) == 7


def test_the_sample_audit_counts_repeats_and_misses(manifest, tmp_path):
    import json

    from pretrain.config import load_config
    from pretrain.sample_audit import count
    from pretrain.sample_ids import SAMPLE_IDS_FILE

    config = load_config(
        "tiny", [f"data.path={manifest['_root']}", "batch.global_batch_size=16", "batch.micro_batch_size=4", "seed=5"]
    )
    order = global_order(shards_of(manifest, "train"), Layout(0, 1, 0, 4, 16), 5, 0, True, 2)
    steps = [[row for mb in order[i : i + 4] for row in mb] for i in range(0, len(order), 4)]

    def log(step_rows):
        (tmp_path / SAMPLE_IDS_FILE).write_text(
            "".join(
                json.dumps({"step": i + 1, "world_size": 2, "samples": rows}) + "\n" for i, rows in enumerate(step_rows)
            )
        )
        return count(tmp_path, config)

    whole = log(steps)
    assert (whole.epoch_sequences, whole.repeated, whole.missing, whole.in_order, whole.ok) == (
        len(order) * 4,
        0,
        0,
        True,
        True,
    )
    repeated = log([steps[0], steps[0], *steps[2:]])  # step 2 trained on step 1's sequences again
    assert (repeated.repeated, repeated.missing, repeated.in_order, repeated.ok) == (16, 16, False, False)
