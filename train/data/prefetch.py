"""One step of batches prepared ahead, on a background thread, while the current step trains.

`next_step()` hands out the micro-batches prepared for this step and at once starts preparing
the next step's; the sample indices are taken on the calling thread (so they are always in
order), only the batch assembly (memmap reads, numpy, pinning) runs in the thread. The saved
position is that of the steps handed out, never the one prefetched, so a checkpoint resumes at
the first sample the run has not trained on.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from train.data.loader import Loader


class Prefetcher:
    """Batches of `accum` micro-batches per step from `loader`, one step ahead."""

    def __init__(self, loader: Loader, accum: int, device: torch.device):
        self.loader, self.accum = loader, accum
        self.pin = device.type == "cuda"
        self.consumed = loader.index              # the position after the last step handed out
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ablate-prefetch")
        self._next: tuple[Future, int] | None = None

    def _assemble(self, indices: list[Any]) -> list[dict[str, torch.Tensor]]:
        batches = [self.loader.samples.batch(ix) for ix in indices]
        if self.pin:                               # pinned host memory: the copy to the GPU is non-blocking
            batches = [{k: v.pin_memory() for k, v in b.items()} for b in batches]
        return batches

    def _submit(self) -> None:
        indices = [self.loader.next_indices() for _ in range(self.accum)]
        self._next = (self._pool.submit(self._assemble, indices), self.loader.index)

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """This step's micro-batches; the next step's start preparing before this returns."""
        if self._next is None:
            self._submit()
        future, after = self._next
        batches = future.result()                 # re-raises an error of the source, here
        self.consumed = after
        self._submit()
        return batches

    def state_dict(self) -> dict[str, int]:
        return {"sample_index": self.consumed}

    def close(self) -> None:
        if self._next is not None:
            self._next[0].cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
