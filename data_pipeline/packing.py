"""Packing token streams into fixed-length sequences (numpy, no per-token Python loops).

``concat``: the documents of a unit's split form one stream, joined by [SEP]; the stream is
cut into chunks of ``seq_len - 2`` tokens and each chunk becomes ``[CLS] chunk [SEP]``.  Long
documents simply run over several sequences.  The last chunk of a unit is padded with [PAD]
after its closing [SEP].  So, per unit and split, concatenating ``seq[1:-1]`` of every sequence
(and cutting the last one at its final non-pad [SEP]) gives back the stream exactly.

``single``: one document per sequence, ``[CLS] doc [SEP] [PAD]...``; a document longer than
``seq_len - 2`` continues in the next sequence(s), so no token is dropped.
"""

from __future__ import annotations

import numpy as np


class Packer:
    def __init__(self, seq_len: int, cls_id: int, sep_id: int, pad_id: int, mode: str = "concat"):
        if seq_len < 3:
            raise ValueError("seq_len must be >= 3")
        if mode not in ("concat", "single"):
            raise ValueError(f"unknown packing mode {mode!r}")
        self.seq_len, self.cls, self.sep, self.pad, self.mode = seq_len, cls_id, sep_id, pad_id, mode
        self.body = seq_len - 2
        self._buf = np.empty(0, dtype=np.uint32)
        self._started = False

    def _frame(self, chunks: np.ndarray) -> np.ndarray:
        """(n, seq_len-2) chunks -> (n, seq_len) sequences [CLS] chunk [SEP]."""
        out = np.empty((chunks.shape[0], self.seq_len), dtype=np.uint32)
        out[:, 0] = self.cls
        out[:, 1:-1] = chunks
        out[:, -1] = self.sep
        return out

    def _padded(self, rest: np.ndarray) -> np.ndarray:
        """One sequence [CLS] rest [SEP] [PAD]... for len(rest) <= seq_len-2."""
        out = np.full((1, self.seq_len), self.pad, dtype=np.uint32)
        out[0, 0] = self.cls
        out[0, 1 : 1 + len(rest)] = rest
        out[0, 1 + len(rest)] = self.sep
        return out

    def add(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Add documents (flat ids + lengths, no empty documents); return finished sequences."""
        n = len(lengths)
        if n == 0:
            return np.empty((0, self.seq_len), dtype=np.uint32)
        if self.mode == "single":
            return self._add_single(flat, lengths)
        # the batch's stream: [SEP] before every document, except the very first of the stream
        stream = np.empty(len(flat) + n, dtype=np.uint32)
        sep_pos = np.arange(n) + np.concatenate(([0], np.cumsum(lengths[:-1])))
        mask = np.ones(len(stream), dtype=bool)
        mask[sep_pos] = False
        stream[sep_pos] = self.sep
        stream[mask] = flat
        if not self._started:
            stream = stream[1:]
            self._started = True
        if len(self._buf):
            stream = np.concatenate((self._buf, stream))
        m = len(stream) // self.body
        self._buf = stream[m * self.body :].copy()
        return self._frame(stream[: m * self.body].reshape(m, self.body))

    def _add_single(self, flat: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        # each document is padded up to a whole number of bodies, then framed
        pieces = -(-lengths // self.body)  # ceil
        total = int(pieces.sum())
        body = np.full(total * self.body, self.pad, dtype=np.uint32)
        starts = np.concatenate(([0], np.cumsum(pieces[:-1]))) * self.body
        # destination index of every token: its document's start + its offset in the document
        doc_of_tok = np.repeat(np.arange(len(lengths)), lengths)
        offs = np.arange(len(flat)) - np.repeat(np.concatenate(([0], np.cumsum(lengths[:-1]))), lengths)
        body[starts[doc_of_tok] + offs] = flat
        out = self._frame(body.reshape(total, self.body))
        # the closing [SEP] of a document's last piece goes right after its last token
        last_row = np.cumsum(pieces) - 1
        fill = lengths - (pieces - 1) * self.body  # tokens in the last piece (1..body)
        short = fill < self.body
        out[last_row[short], -1] = self.pad
        out[last_row[short], 1 + fill[short]] = self.sep
        return out

    def finish(self) -> np.ndarray:
        """The last, padded sequence of the stream (if any tokens are left)."""
        if self.mode == "concat" and len(self._buf):
            rest, self._buf = self._buf, np.empty(0, dtype=np.uint32)
            return self._padded(rest)
        return np.empty((0, self.seq_len), dtype=np.uint32)


def unpack(
    seqs: list[np.ndarray] | np.ndarray, cls_id: int, sep_id: int, pad_id: int, mode: str = "concat"
) -> list[list[int]]:
    """Inverse of packing for one unit's split: sequences -> documents (lists of ids).

    Used by tests and ``inspect``; assumes documents contain no [SEP] id (the build
    guarantees it: special-token text in documents is tokenized as text).  For ``single``
    the result is one list per sequence (a long document's pieces, see below).
    """
    docs: list[list[int]] = []
    if mode == "concat":
        stream: list[int] = []
        for s in seqs:
            s = [int(x) for x in s]
            assert s[0] == cls_id, "sequence does not start with [CLS]"
            end = len(s) - 1
            while s[end] == pad_id:
                end -= 1
            assert s[end] == sep_id, "sequence does not end with [SEP]"
            stream.extend(s[1:end])
        cur: list[int] = []
        for t in stream:
            if t == sep_id:
                docs.append(cur)
                cur = []
            else:
                cur.append(t)
        if stream:
            docs.append(cur)
        return docs
    # single: a document longer than seq_len-2 spans several full sequences, and a full
    # sequence cannot tell "continues" from "ends exactly here"; so return the pieces
    # (one list per sequence), which is what the documents chunked by seq_len-2 give.
    for s in seqs:
        s = [int(x) for x in s]
        end = len(s) - 1
        while s[end] == pad_id:
            end -= 1
        assert s[0] == cls_id and s[end] == sep_id, "malformed sequence"
        docs.append(s[1:end])
    return docs
