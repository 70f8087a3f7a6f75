"""Peak tensor memory of a piece of work, on CUDA and on CPU alike.

CUDA has allocator statistics. The CPU allocator keeps none, so there the peak is tracked
from the tensors themselves: a dispatch mode sees every tensor an aten op returns (in
forward, in backward, and the gradients autograd writes) and counts each new storage
until it is freed. That is what lets tests check memory claims, such as chunked
`head_loss` never holding a whole-sequence logits tensor, on a machine with no GPU.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_iter
from torch.utils.weak import WeakIdKeyDictionary


def peak_memory_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes of tensor memory allocated on `device` while fn() runs (say forward +
    backward), above what was allocated before it started.

    CUDA: the caching allocator's peak (rounded to its 512-byte blocks). Elsewhere: the
    largest total of live tensor storages between two aten ops, counting storages created
    inside fn only (views of older tensors are not new memory). Scratch buffers that a
    kernel allocates and frees inside one op are invisible there, so on CPU this is a lower
    bound of the true peak; it is exact for the tensors autograd saves and the gradients.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with _LiveStorageTracker(device) as tracker:
        fn()
    return tracker.peak


class _LiveStorageTracker(TorchDispatchMode):
    """Sums the bytes of the storages that ops create on one device while they stay alive."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device
        self.live = 0
        self.peak = 0
        self._seen = WeakIdKeyDictionary()       # storage -> bytes counted for it (0: older than us)

    def _matches(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Storages the op was handed (inputs, out=, in-place targets) are not new memory.
        for t in tree_iter((args, kwargs)):
            if isinstance(t, torch.Tensor) and self._matches(t):
                st = t.untyped_storage()
                if st not in self._seen:
                    self._seen[st] = 0
        for t in tree_iter(out):
            if isinstance(t, torch.Tensor) and self._matches(t):
                st = t.untyped_storage()
                if st not in self._seen:
                    nbytes = st.nbytes()
                    self._seen[st] = nbytes
                    self.live += nbytes
                    weakref.finalize(st, self._freed, nbytes)
        self.peak = max(self.peak, self.live)
        return out
