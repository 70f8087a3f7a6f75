"""Batches of fixed-length windows in a seed-determined order, resumable from one integer.

`Windows` (training) and `OrderedWindows` (validation) are the token splits' `Samples`
(train/data/source.py); `Loader` turns any `Samples` into one rank's batches.

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

from typing import Any

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


class Windows:
    """Training samples of a token split: global sample g is window perm_e[g mod n], e = g // n,
    perm_e drawn from (seed, e)."""

    def __init__(self, data: TokenData, seq_len: int, seed: int):
        self.n = n_windows(data, seq_len)
        if self.n < 1:
            raise DataError("data.seq_len", f"the training split has {len(data)} tokens, fewer than one "
                            f"window of seq_len + 1 = {seq_len + 1}")
        self.data, self.seq_len, self.seed = data, seq_len, seed
        self._epoch = -1
        self._perm = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return self.n

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

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return make_batch(self.data, self.windows(indices), self.seq_len, indices)


class OrderedWindows:
    """Validation samples of a token split: sample i is window i (the same text every time)."""

    def __init__(self, data: TokenData, seq_len: int):
        self.data, self.seq_len = data, seq_len
        self.n = n_windows(data, seq_len)

    def __len__(self) -> int:
        return self.n

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        return make_batch(self.data, indices, self.seq_len, indices)


class Loader:
    """Training batches for one rank from any `Samples`; `state_dict()` is the next global sample
    index. Ranks take consecutive slices of each global batch."""

    def __init__(self, samples: Any, batch_size: int, rank: int = 0, world_size: int = 1, start_index: int = 0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.samples, self.batch_size = samples, batch_size
        self.rank, self.world_size = rank, world_size
        self.index = start_index

    def next_indices(self) -> np.ndarray:
        """This rank's sample indices of the next batch; advances the state."""
        first = self.index + self.rank * self.batch_size
        self.index += self.batch_size * self.world_size
        return np.arange(first, first + self.batch_size, dtype=np.int64)

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.samples.batch(self.next_indices())

    def __iter__(self):
        while True:
            yield self.next_batch()

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed so far (for logs)."""
        return self.index / max(len(self.samples), 1)

    def state_dict(self) -> dict:
        return {"sample_index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.index = int(state["sample_index"])


def fixed_batches(samples: Any, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first n_batches * batch_size validation samples, in order (fewer, and a last partial
    batch, when there are fewer; none when `samples` is None or empty)."""
    count = min(len(samples), n_batches * batch_size) if samples is not None else 0
    return [samples.batch(np.arange(lo, min(count, lo + batch_size), dtype=np.int64))
            for lo in range(0, count, batch_size)]


def val_batches(data: TokenData, seq_len: int, batch_size: int, n_batches: int) -> list[dict[str, torch.Tensor]]:
    """The first n_batches * batch_size windows, in order: the same validation text at every eval.

    Fewer (and a last partial batch) when the split is small; none when it is empty.
    """
    return fixed_batches(OrderedWindows(data, seq_len), batch_size, n_batches)
