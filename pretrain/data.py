"""Masked-LM batches from data_pipeline shards: one global sample order per epoch, whatever the world size
and the number of loader workers, served by the ranks in parts, masked on the fly, and resumable from a
two-number cursor without re-reading what came before.

The order of an epoch is a pure function of (seed, epoch, data.streams S, micro-batch size):

1. the train shards in a seeded order (manifest order when shuffling is off);
2. their samples, concatenated in that order, cut into S equal contiguous ranges, the *virtual streams*;
   the remainder (< S samples) is dropped;
3. a stream reads its range in chunks of `shuffle_shards` shard pieces, shuffles each chunk in memory
   (seeded by (seed, epoch, stream, chunk)) and cuts it into micro-batches; the partial last micro-batch
   of a stream is dropped, so every stream has the same number B of micro-batches (an epoch drops less
   than one micro-batch and one sample per stream);
4. the epoch's global micro-batch m (0 <= m < S x B) is micro-batch m // S of stream m % S: a round robin
   over the streams. Training takes global micro-batches in that order, epoch after epoch, G = global
   batch / micro-batch of them per optimizer step, however they are split over ranks and accumulation;
5. every sample is masked with a generator seeded by (seed, epoch, shard, index in shard), so masks are
   dynamic (new each epoch) and independent of the layout.

Serving it on W ranks with w DataLoader workers each (W x w must divide S): rank r takes global
micro-batches m = i W + r (its i-th), which come from its S / W streams s = r + W k; the DataLoader
yields its workers' batches in round robin, so worker j serves the rank's micro-batches i = j (mod w),
whose streams are k = j (mod w). Each stream is still read sequentially, shard piece after piece;
a worker holds one chunk per stream it serves: memory per rank is about S / W x `shuffle_shards` shards.

The cursor is global: (epoch, micro-batches the whole job consumed in the epoch), the same on every rank.
A resume on W' ranks starts rank r at its micro-batch i = cursor / W'; each stream skips whole chunks by
their sample counts from the manifest (those shards are never opened) and reads only the chunk it
stopped in, whose shuffle and masks are recomputed from their seeds. So the run continues at the same
global sample, on any layout that divides S.

Shards are only read through `data_pipeline.shards` (`shard_urls`, `read_shard`), which checks every id
against the vocabulary and each shard's sha256 as it reads; a chunk is read whole before any of its
micro-batches is made, so no step trains on a sample of a corrupt shard.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shards import read_shard, shard_urls
from hypermixer import IGNORE_INDEX

# Domain tags in the seeds, so that no two kinds of randomness ever share a generator state.
SHARD_ORDER, CHUNK_ORDER, TRAIN_MASKS, VALIDATION_MASKS = 0, 1, 2, 3


@dataclass(frozen=True)
class Shard:
    index: int  # position in the manifest's split (its identity in every seed)
    url: str
    samples: int
    sha256: str | None = None


@dataclass(frozen=True)
class Piece:
    """Samples [start, stop) of one shard."""

    shard: Shard
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


@dataclass
class Cursor:
    """Where the job's training stream stands: global micro-batches (all ranks) consumed in `epoch`.
    The same on every rank and for every layout."""

    epoch: int = 0
    micro_batches: int = 0

    def to_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Layout:
    rank: int
    world_size: int
    num_workers: int  # DataLoader workers per rank; 0 reads in the training process
    micro_batch_size: int
    streams: int = 16  # virtual streams S (data.streams; its default there): fixes the order, not the layout

    @property
    def workers(self) -> int:
        return max(1, self.num_workers)

    @property
    def streams_per_rank(self) -> int:
        return self.streams // self.world_size

    def problem(self) -> str | None:
        """Why this layout cannot serve the order (None: it can)."""
        if self.streams % (self.world_size * self.workers):
            return (
                f"data.streams ({self.streams}) must be a multiple of world size x loader workers "
                f"({self.world_size} x {self.workers} = {self.world_size * self.workers})"
            )
        return None

    def samples_per_stream(self, total_samples: int) -> int:
        return total_samples // self.streams

    def batches_per_stream(self, total_samples: int) -> int:
        return self.samples_per_stream(total_samples) // self.micro_batch_size

    def global_batches_per_epoch(self, total_samples: int) -> int:
        """Micro-batches of the whole job per epoch (the same for every layout)."""
        return self.streams * self.batches_per_stream(total_samples)

    def batches_per_epoch(self, total_samples: int) -> int:
        """Micro-batches each rank gets per epoch (the same on every rank)."""
        return self.global_batches_per_epoch(total_samples) // self.world_size


class Masking:
    """BERT's dynamic masking: select `mask_prob` of the non-special tokens; of those, `mask_token_prob`
    become [MASK], `random_token_prob` a random non-special token, the rest stay. Labels are the
    original ids at selected positions and IGNORE_INDEX elsewhere (special tokens and padding never)."""

    def __init__(
        self,
        special_ids: dict[str, int],
        vocab_size: int,
        mask_prob: float = 0.15,
        mask_token_prob: float = 0.8,
        random_token_prob: float = 0.1,
    ) -> None:
        self.vocab_size = int(vocab_size)
        self.mask_id = int(special_ids["mask"])
        self.pad_id = int(special_ids["pad"])
        self.special = np.array(sorted(set(int(v) for v in special_ids.values())), dtype=np.int64)
        self.random_pool = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), self.special)
        self.mask_prob = mask_prob
        self.mask_token_prob = mask_token_prob
        self.random_token_prob = random_token_prob

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any], data_config: Any) -> Masking:
        return cls(
            manifest["special_ids"],
            manifest["vocab_size"],
            data_config.mask_prob,
            data_config.mask_token_prob,
            data_config.random_token_prob,
        )

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        length = ids.shape[0]
        selected = ~np.isin(ids, self.special) & (rng.random(length) < self.mask_prob)
        action = rng.random(length)
        to_mask = selected & (action < self.mask_token_prob)
        to_random = (
            selected & (action >= self.mask_token_prob) & (action < self.mask_token_prob + self.random_token_prob)
        )
        inputs = ids.copy()
        inputs[to_mask] = self.mask_id
        inputs[to_random] = self.random_pool[rng.integers(0, len(self.random_pool), int(to_random.sum()))]
        labels = np.where(selected, ids, IGNORE_INDEX)
        return inputs, labels


def shards_of(manifest: dict[str, Any], split: str) -> list[Shard]:
    urls = shard_urls(manifest, split)
    records = manifest["splits"][split]["shards"]
    return [Shard(i, url, int(rec["samples"]), rec.get("sha256")) for i, (url, rec) in enumerate(zip(urls, records))]


def cut(shards: list[Shard], lo: int, hi: int) -> list[Piece]:
    """The pieces covering samples [lo, hi) of the shards' concatenation (in the order given)."""
    pieces, offset = [], 0
    for shard in shards:
        start, stop = max(lo - offset, 0), min(hi - offset, shard.samples)
        if start < stop:
            pieces.append(Piece(shard, start, stop))
        offset += shard.samples
        if offset >= hi:
            break
    return pieces


def shard_order(shards: list[Shard], seed: int, epoch: int, shuffle: bool) -> list[Shard]:
    if not shuffle:
        return list(shards)
    order = np.random.default_rng([seed, SHARD_ORDER, epoch]).permutation(len(shards))
    return [shards[i] for i in order]


def stream_pieces(
    shards: list[Shard], layout: Layout, stream: int, seed: int, epoch: int, shuffle: bool
) -> list[Piece]:
    """The pieces of virtual stream `stream`'s range, in reading order."""
    per_stream = layout.samples_per_stream(sum(s.samples for s in shards))
    return cut(shard_order(shards, seed, epoch, shuffle), stream * per_stream, (stream + 1) * per_stream)


def chunk_origins(chunk: list[Piece]) -> list[tuple[int, int]]:
    """(shard index, index in shard) of a chunk's samples, in reading order."""
    return [(piece.shard.index, i) for piece in chunk for i in range(piece.start, piece.stop)]


def chunk_order(size: int, seed: int, epoch: int, stream: int, chunk_index: int, shuffle: bool) -> np.ndarray:
    """The in-memory shuffle of a chunk of virtual stream `stream` (chunk_index: its first piece's place)."""
    if not shuffle:
        return np.arange(size)
    return np.random.default_rng([seed, CHUNK_ORDER, epoch, stream, chunk_index]).permutation(size)


def global_order(
    shards: list[Shard], layout: Layout, seed: int, epoch: int, shuffle: bool, shuffle_shards: int
) -> list[list[tuple[int, int]]]:
    """The epoch's global micro-batches, each as its (shard index, index in shard) rows, from the manifest's
    counts alone (no shard is read). Only layout.streams and layout.micro_batch_size matter: the order is
    the same for every world size and worker count. What training consumes; for tests and audits."""
    mb = layout.micro_batch_size
    per_stream = layout.batches_per_stream(sum(s.samples for s in shards))
    streams = []
    for stream in range(layout.streams):
        pieces = stream_pieces(shards, layout, stream, seed, epoch, shuffle)
        ids: list[tuple[int, int]] = []
        for chunk_index in range(0, len(pieces), shuffle_shards):
            chunk = pieces[chunk_index : chunk_index + shuffle_shards]
            origin = chunk_origins(chunk)
            ids += [origin[k] for k in chunk_order(len(origin), seed, epoch, stream, chunk_index, shuffle)]
        streams.append([ids[b * mb : (b + 1) * mb] for b in range(per_stream)])
    return [streams[m % layout.streams][m // layout.streams] for m in range(layout.streams * per_stream)]


def read_piece(piece: Piece, seq_len: int, vocab_size: int | None = None) -> Iterator[np.ndarray]:
    """The piece's samples in shard order, checked (ids, the shard's sha256: see `read_shard`). Blocks
    that end before `start` stream through the hash without being decoded."""
    yield from read_shard(
        piece.shard.url,
        seq_len=seq_len,
        vocab_size=vocab_size,
        sha256=piece.shard.sha256,
        start=piece.start,
        stop=piece.stop,
    )


def collate(
    rows: list[tuple[np.ndarray, np.ndarray]], pad_id: int, origins: list[tuple[int, int]] | None = None
) -> dict[str, torch.Tensor]:
    """A micro-batch; `sample_ids` (rows of [shard index, index in shard]) when origins are given."""
    inputs = torch.from_numpy(np.stack([r[0] for r in rows]))
    labels = torch.from_numpy(np.stack([r[1] for r in rows]))
    batch = {"input_ids": inputs, "attention_mask": (inputs != pad_id).long(), "labels": labels}
    if origins is not None:
        batch["sample_ids"] = torch.tensor(origins, dtype=torch.int64)
    return batch


@dataclass(frozen=True)
class StreamSpec:
    """Everything a worker needs to produce its micro-batches of one epoch (picklable)."""

    shards: tuple[Shard, ...]
    layout: Layout
    masking: Masking
    seq_len: int
    seed: int
    epoch: int
    start_batch: int  # micro-batches of this epoch this rank has already consumed (global cursor / world size)
    shuffle: bool
    shuffle_shards: int


class TrainStream(IterableDataset):
    def __init__(self, spec: StreamSpec) -> None:
        self.spec = spec

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        yield from rank_batches(self.spec, info.id if info is not None else 0)


def rank_batches(spec: StreamSpec, worker: int) -> Iterator[dict[str, torch.Tensor]]:
    """DataLoader worker `worker`'s share of its rank's micro-batches i = start + worker, start + worker + w,
    ...: the DataLoader's round robin over the workers then yields the rank's micro-batches in order.
    Rank micro-batch i is micro-batch i // K of the rank's stream k = i % K (K streams per rank)."""
    layout = spec.layout
    per_rank = layout.streams_per_rank
    end = layout.batches_per_epoch(sum(s.samples for s in spec.shards))
    streams: dict[int, Iterator[dict[str, torch.Tensor]]] = {}
    for i in range(spec.start_batch + worker, end, layout.workers):
        k = i % per_rank
        if k not in streams:  # opened at its first micro-batch still to come; lazy, one chunk at a time
            streams[k] = stream_batches(spec, layout.rank + layout.world_size * k, i // per_rank)
        yield next(streams[k])


def stream_batches(spec: StreamSpec, stream: int, done_batches: int) -> Iterator[dict[str, torch.Tensor]]:
    """Micro-batches of one stream in one epoch, from micro-batch `done_batches` on."""
    mb = spec.layout.micro_batch_size
    pieces = stream_pieces(list(spec.shards), spec.layout, stream, spec.seed, spec.epoch, spec.shuffle)
    usable = spec.layout.batches_per_stream(sum(s.samples for s in spec.shards)) * mb
    skip = done_batches * mb
    position = 0  # samples of the stream before the current chunk
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    origins: list[tuple[int, int]] = []  # the rows' (shard, index): a micro-batch may span two chunks
    for chunk_index in range(0, len(pieces), spec.shuffle_shards):
        chunk = pieces[chunk_index : chunk_index + spec.shuffle_shards]
        size = sum(p.size for p in chunk)
        if position + size <= skip:  # consumed before the checkpoint: skipped by count, never opened
            position += size
            continue
        if position >= usable:
            break
        ids = [sample for piece in chunk for sample in read_piece(piece, spec.seq_len, spec.masking.vocab_size)]
        origin = chunk_origins(chunk)
        order = chunk_order(size, spec.seed, spec.epoch, stream, chunk_index, spec.shuffle)
        for k in order[max(skip - position, 0) : min(size, usable - position)]:
            shard_index, sample_index = origin[k]
            rng = np.random.default_rng([spec.seed, TRAIN_MASKS, spec.epoch, shard_index, sample_index])
            rows.append(spec.masking(ids[k], rng))
            origins.append(origin[k])
            if len(rows) == mb:
                yield collate(rows, spec.masking.pad_id, origins)
                rows, origins = [], []
        position += size


class TrainBatches:
    """Endless micro-batches over epochs for one rank; `cursor` counts what the job's training loop took
    (every rank takes one micro-batch at a time, in step: world_size global micro-batches)."""

    def __init__(
        self,
        manifest: dict[str, Any],
        layout: Layout,
        masking: Masking,
        seed: int,
        shuffle: bool,
        shuffle_shards: int,
        cursor: Cursor | None = None,
        pin_memory: bool = False,
        record_ids: bool = False,
    ) -> None:
        self.shards = tuple(shards_of(manifest, "train"))
        self.layout = layout
        self.masking = masking
        self.seq_len = int(manifest["seq_len"])
        self.seed, self.shuffle, self.shuffle_shards = seed, shuffle, shuffle_shards
        self.cursor = Cursor(**(cursor.to_dict() if cursor else {}))
        self.pin_memory = pin_memory
        # record_ids: keep each micro-batch's [shard, index] rows in `taken_ids` until the caller takes them
        self.taken_ids: list[torch.Tensor] | None = [] if record_ids else None
        problem = layout.problem()
        if problem:
            raise ValueError(problem)
        self.batches_per_epoch = layout.batches_per_epoch(sum(s.samples for s in self.shards))
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"the train split has {sum(s.samples for s in self.shards)} sequences: fewer than one "
                f"micro-batch ({layout.micro_batch_size}) per stream ({layout.streams} streams)"
            )
        if self.cursor.micro_batches % layout.world_size:
            raise ValueError(
                f"the data cursor ({self.cursor.micro_batches} micro-batches into epoch "
                f"{self.cursor.epoch}) is not a whole number of micro-steps on {layout.world_size} ranks"
            )
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def _loader(self) -> DataLoader:
        spec = StreamSpec(
            self.shards,
            self.layout,
            self.masking,
            self.seq_len,
            self.seed,
            self.cursor.epoch,
            self.cursor.micro_batches // self.layout.world_size,
            self.shuffle,
            self.shuffle_shards,
        )
        workers = self.layout.num_workers
        # Its own generator: a DataLoader draws a base seed when it starts iterating, and drawing it from
        # the global RNG would shift the dropout masks of a resumed run against the uninterrupted one.
        return DataLoader(
            TrainStream(spec),
            batch_size=None,
            num_workers=workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if workers else None,
            generator=torch.Generator().manual_seed(0),
            worker_init_fn=leave_stop_signals_to_the_rank if workers else None,
        )

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        while True:
            if self._iterator is None:
                self._iterator = iter(self._loader())
            try:
                batch = next(self._iterator)
            except StopIteration:
                self._iterator = None
                self.cursor = Cursor(self.cursor.epoch + 1, 0)
                continue
            self.cursor.micro_batches += self.layout.world_size
            ids = batch.pop("sample_ids")
            if self.taken_ids is not None:
                self.taken_ids.append(ids)
            return batch

    def close(self) -> None:
        self._iterator = None  # shuts the DataLoader's workers down


def leave_stop_signals_to_the_rank(worker_id: int) -> None:
    """In a loader worker: leave the stop signals (SIGTERM, SIGUSR1) that the job's launcher sends to their
    rank. A preemption signals every process of the job (torchrun each rank's process group; SLURM every
    process of the step); a worker it ended would fail its rank in the middle of the stop checkpoint. A SIGTERM
    from the worker's own rank still ends it: that is how torch shuts down a worker that does not answer, and
    how multiprocessing ends daemonic children at exit before it joins them (a worker deaf to it would hang
    its rank's exit). A worker whose rank died ends by itself (torch's DataLoader watches the parent)."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # no sender to tell apart (macOS): SIGTERM ends the worker
        return
    # Blocked here, before the worker starts any thread, so that every thread inherits the mask and the
    # signal waits for the thread below, which knows who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_sigterm_from_parent, name="sigterm", daemon=True).start()


def _end_on_sigterm_from_parent() -> None:
    parent = os.getppid()
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(128 + signal.SIGTERM)


def validation_samples(manifest: dict[str, Any], split: str, world_size: int, max_samples: int | None) -> int:
    """Validation sequences each rank evaluates (equal on every rank, so collectives stay in step)."""
    total = sum(s.samples for s in shards_of(manifest, split))
    return min(total, max_samples or total) // world_size


def validation_batches(
    manifest: dict[str, Any],
    split: str,
    masking: Masking,
    seed: int,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    max_samples: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Rank `rank`'s share of the first `max_samples` validation sequences, in manifest order, with
    masks fixed by (seed, shard, index): every evaluation (and every run with this seed) sees the same
    inputs and targets, whatever the world size."""
    per_rank = validation_samples(manifest, split, world_size, max_samples)
    pieces = cut(shards_of(manifest, split), rank * per_rank, (rank + 1) * per_rank)
    seq_len = int(manifest["seq_len"])
    rows: list[tuple[np.ndarray, np.ndarray]] = []
    for piece in pieces:
        for offset, sample in enumerate(read_piece(piece, seq_len, masking.vocab_size)):
            rng = np.random.default_rng([seed, VALIDATION_MASKS, piece.shard.index, piece.start + offset])
            rows.append(masking(sample, rng))
            if len(rows) == micro_batch_size:
                yield collate(rows, masking.pad_id)
                rows = []
    if rows:
        yield collate(rows, masking.pad_id)
