"""Batches of fixed-length windows in a seed-determined order, resumable from one integer.

The tokens are cut into non-overlapping windows of seq_len + 1 tokens (window k starts at
k * seq_len, so consecutive windows share one token and every token after the first is a
target once per epoch). Global sample g is window perm_e[g mod n] with e = g // n and perm_e
a permutation drawn from (data.seed, e): a new order each epoch, and the whole state is g.
Ranks take consecutive slices of each global batch, so the samples seen by the run do not
depend on the number of ranks.

A batch holds `input_ids` (window[:-1]) and `labels` (window[1:], -100 where the label is the
pad token), both int64 (B, T); `doc_ids` (B, T): the document index of each input position
inside its window (0 for the document the window starts in, +1 at each document start; a
document starts at its EOS token), for loss masks and intra-document attention; and `indices`
(B,): the global sample indices (or, for validation, window indices) in the batch.
"""
from __future__ import annotations

import numpy as np
import torch

from train.data.errors import DataError
from train.data.prepared import TokenData

IGNORE_INDEX = -100


def n_windows(data: TokenData, seq_len: int) -> int:
    return max(0, (len(data) - 1) // seq_len)


def make_batch(data: TokenData, windows: np.ndarray, seq_len: int, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """The batch dict for the given window numbers."""
    starts = windows.astype(np.int64) * seq_len
    x = np.stack([np.asarray(data.tokens[s:s + seq_len + 1]) for s in starts]).astype(np.int64)
    labels = x[:, 1:].copy()
    if data.pad_id is not None:
        labels[labels == data.pad_id] = IGNORE_INDEX
    positions = starts[:, None] + np.arange(seq_len, dtype=np.int64)[None, :]
    docs = np.searchsorted(data.doc_starts, positions, side="right")
    docs -= docs[:, :1]
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(x[:, :-1])),
            "labels": torch.from_numpy(labels),
            "doc_ids": torch.from_numpy(docs.astype(np.int64)),
            "indices": torch.from_numpy(np.asarray(indices, dtype=np.int64))}


class Loader:
    """Training batches for one rank; `state_dict()` is the next global sample index."""

    def __init__(self, data: TokenData, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, start_index: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n = n_windows(data, seq_len)
        if self.n < 1:
            raise DataError("data.seq_len", f"the training split has {len(data)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self.data, self.seq_len, self.batch_size, self.seed = data, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.index = start_index
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch (the current one is kept)."""
        if epoch != self._epoch:
            rng = np.random.default_rng([abs(self.seed), int(self.seed < 0), epoch])
            self._perm = rng.permutation(self.n)
            self._epoch = epoch
        return self._perm

    def windows(self, indices: np.ndarray) -> np.ndarray:
        out = np.empty(len(indices), dtype=np.int64)
        for j, g in enumerate(indices.tolist()):
            epoch, pos = divmod(g, self.n)
            out[j] = self.permutation(epoch)[pos]
        return out

    def next_batch(self) -> dict[str, torch.Tensor]:
        first = self.index + self.rank * self.batch_size
        indices = np.arange(first, first + self.batch_size, dtype=np.int64)
        self.index += self.batch_size * self.world_size
        return make_batch(self.data, self.windows(indices), self.seq_len, indices)

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed so far (for logs)."""
        return self.index / self.n

    def state_dict(self) -> dict:
        return {"sample_index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["sample_index"])


def val_batches(data: TokenData, seq_len: int, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first n_batches * batch_size windows, in order: the same validation text at every eval.

    Fewer (and a last partial batch) when the split is small; none when it is empty.
    """
    count = min(n_windows(data, seq_len), n_batches * batch_size)
    out = []
    for lo in range(0, count, batch_size):
        w = np.arange(lo, min(count, lo + batch_size), dtype=np.int64)
        out.append(make_batch(data, w, seq_len, w))
    return out
