"""How the model wants to be parallelised, declared beside the model code and applied from
outside (train/parallel.py `apply_parallelism`), as torchtitan keeps `parallelize.py` next to
each model: activation checkpointing, then per-block compile, then FSDP2 units.

The default is "checkpoint / compile / shard each block, then the root". A module changes its
own treatment with a `parallel_hint` attribute, so a technique never edits the decoder or the
backend for it:

- `ParallelHint(shard_self=True)`: its parameters are left out of `fully_shard`
  (`ignored_params`) because the module shards them its own way, in its `shard(mesh)` method,
  called with FSDP2's mesh before `fully_shard` (e.g. a memory layer's value table split along
  the embedding dimension).
- `ParallelHint(own_unit=True)`: it gets its own `fully_shard` unit (its parameters are
  all-gathered only around its own forward).
- `ParallelHint(reshard_after_forward=False)`: its unit stays unsharded between forward and
  backward (no second all-gather in backward, more memory).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn


@dataclass(frozen=True)
class ParallelHint:
    shard_self: bool = False
    own_unit: bool = False
    reshard_after_forward: bool | None = None     # None: parallel.reshard_after_forward


@dataclass
class ParallelPlan:
    """units: module names that get their own fully_shard, in order (the root comes last, with
    everything not in a unit). checkpointable: the modules activation checkpointing counts
    (every_k takes every k-th of them); compiled: the modules compiled one by one.
    ignored_params: parameter names FSDP2 leaves alone. reshard_after_forward: per-unit overrides."""

    units: list[str]
    checkpointable: list[str]
    compiled: list[str]
    ignored_params: list[str] = field(default_factory=list)
    reshard_after_forward: dict[str, bool] = field(default_factory=dict)
    self_sharded: list[str] = field(default_factory=list)   # modules whose `shard(mesh)` shards them


def collect_hints(model: nn.Module, plan: ParallelPlan) -> ParallelPlan:
    """Fold every module's `parallel_hint` into `plan`."""
    for name, module in model.named_modules():
        hint: ParallelHint | None = getattr(module, "parallel_hint", None)
        if hint is None or not name:
            continue
        if hint.shard_self:
            plan.ignored_params += [f"{name}.{p}" for p, _ in module.named_parameters()]
            plan.self_sharded.append(name)
        if hint.own_unit and name not in plan.units:
            plan.units.append(name)
        if hint.reshard_after_forward is not None:
            plan.reshard_after_forward[name] = hint.reshard_after_forward
    return plan
