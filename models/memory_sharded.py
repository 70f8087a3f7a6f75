"""The memory value table sharded by columns over the data-parallel ranks (FSDP2 runs).

Under FSDP2 a 1M-slot table would otherwise be all-gathered whole around every forward and
backward (4 GiB in fp32 at v_dim 1024) and its gradient reduce-scattered every step. Instead it
is a DTensor `Shard(1)` over the data-parallel mesh, left out of `fully_shard`: rank r holds
every slot's columns [r v/P, (r+1) v/P). A read, for the N tokens of each rank:

    forward   all-gather (slots, weights) of every rank's tokens         (P N, K) each
              embedding_bag over this rank's columns for all P N tokens  (P N, v/P)
              all-to-all: each token's column blocks go back to its rank (N, v)
    backward  all-to-all of the output gradient (each rank's columns of every token),
              the bag's backward on the local columns (table and weight gradients), and an
              all-to-all summing each token's weight gradient over the column blocks

The table's gradient is complete on each rank (every token's contribution to its columns is
there), so it needs no reduction; it is divided by P like FSDP2 averages the other gradients
(the trainer scales each rank's loss by P). Why columns rather than rows (`Shard(0)`, each rank
serving the slots it owns): per rank and micro-batch the column scheme moves
(P-1) N [K (b_idx + b_w) + 2 v b_v / P + K b_w] bytes, the row scheme (P-1) N [K (b_idx + b_w) +
2 v b_v] + N K b_w, since every rank's partial sums of whole value vectors must be reduced; the
figures for the 350m config with 1M slots are in docs/memory.md. This follows "Memory Layers at
Scale" (Berges, Oguz et al., arXiv 2412.09764), which shards the values along the embedding
dimension.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _all_to_all(x: torch.Tensor, group: Any) -> torch.Tensor:
    """x (P, ...): block p goes to rank p; returns (P, ...) with block p from rank p."""
    x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)   # a gradient may come in permuted
    dist.all_to_all_single(out, x, group=group)
    return out


def _all_gather(x: torch.Tensor, group: Any) -> torch.Tensor:
    """(N, ...) on each rank -> (P N, ...), ranks in order."""
    P = dist.get_world_size(group)
    out = x.new_empty((P * x.shape[0], *x.shape[1:]))
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


class _GatherTokens(torch.autograd.Function):
    """All-gather a per-token tensor; backward sums each rank's part of the gradient back to it."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group, ctx.n = group, x.shape[0]
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        P = dist.get_world_size(ctx.group)
        blocks = grad.reshape(P, ctx.n, *grad.shape[1:])
        return _all_to_all(blocks, ctx.group).sum(0), None


class _ToOwners(torch.autograd.Function):
    """(P, N, c): block p (rank p's tokens, this rank's columns) to rank p; backward: the reverse."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def column_sharded_bag(slots: torch.Tensor, weights: torch.Tensor, table: Any) -> torch.Tensor:
    """sum_j weights[t, j] * table[slots[t, j]] for this rank's tokens, `table` a DTensor
    sharded Shard(1) over a 1-D mesh (every rank must call this, with the same N)."""
    group = table.device_mesh.get_group()
    P = dist.get_world_size(group)
    N = slots.shape[0]
    local = _ScaleGrad.apply(table.to_local(), 1.0 / P)       # averaged over ranks, as FSDP2 does
    all_slots = _all_gather(slots, group)                      # integer: no gradient
    all_weights = _GatherTokens.apply(weights, group)
    part = F.embedding_bag(all_slots, local, per_sample_weights=all_weights, mode="sum")   # (P N, v/P)
    mine = _ToOwners.apply(part.view(P, N, -1), group)         # block r: rank r's columns of my tokens
    return mine.permute(1, 0, 2).reshape(N, -1)


def is_sharded(table: torch.Tensor) -> bool:
    return hasattr(table, "device_mesh") and hasattr(table, "to_local")


def shard_columns(module: torch.nn.Module, mesh: Any, key: str = "model.memory.v_dim") -> None:
    """Replace `module.weight` (slots, v_dim) by a DTensor Shard(1) over the 1-D `mesh`."""
    from torch.distributed.tensor import Shard, distribute_tensor

    if mesh.ndim != 1:
        from models.registry import ConfigError
        raise ConfigError("parallel.replicate", "the memory value table shards over one data-parallel mesh "
                          "dimension; HSDP (parallel.replicate > 1) is not supported with memory layers")
    P = mesh.size()
    v = module.weight.shape[1]
    if v % P:
        from models.registry import ConfigError
        raise ConfigError(key, f"the value dimension {v} is not divisible by the {P} data-parallel ranks the "
                          "value table is sharded over (by columns)")
    weight = module.weight
    module.weight = torch.nn.Parameter(distribute_tensor(weight.data, mesh, [Shard(1)]),
                                       requires_grad=weight.requires_grad)
