"""Callbacks: everything around the training step that a technique or a policy adds.

A callback sees the trainer through `TrainState` at fixed points of the loop:

    on_step_start(state)            before the step's forward (schedules set module flags here)
    on_step_end(state, metrics)     after the optimizer step (policies: checkpoint, eval)
    on_validation(state, val)       after a validation pass (probes): the first set's row;
                                    every set's newest row is in state.last_val
    on_checkpoint(state) -> dict    its state, saved under `callbacks.<name>` in the checkpoint
    load_state_dict(dict)           that state back, on resume
    on_end(state)                   once, when training finishes (not on a stop for requeue)

Technique callbacks live one per file in this package and register a factory with
`@register_callback("name")`: `factory(cfg) -> Callback | None` (None: not active for this
config). `default_callbacks(cfg)` builds every active one; the trainer never changes for a
technique. Callbacks from `eval/` (lm-eval in the loop, probes) are handed in by the composition
root (train/cli.py), since nothing else in `train/` imports `eval/`.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

if TYPE_CHECKING:
    from train.config import Config
    from train.parallel import Backend
    from train.rundir import RunDir


@dataclass
class TrainState:
    """What callbacks may read (and, for `request_checkpoint`, set)."""

    cfg: Config
    model: nn.Module                       # the unwrapped model (the Decoder)
    optimizer: torch.optim.Optimizer
    backend: Backend                       # collectives: backend.all_sum / any / barrier
    run: RunDir | None                     # None: a run without a run dir (bench, coordcheck)
    log: Callable[[dict[str, Any]], None]  # append a metrics row (rank 0 writes; others drop it)
    device: torch.device
    step: int = 0                          # optimizer updates done so far
    data: Any = None                       # the training source's Dataset (train/data/source.py)
    val_sets: dict[str, list] = field(default_factory=dict)   # validation set name -> its fixed batches
    val_batches: list = field(default_factory=list)           # the first validation set's batches (probes)
    last_val: dict[str, dict] = field(default_factory=dict)   # set name -> its newest val row
    request_checkpoint: bool = False       # set by a callback in on_step_end: save at this boundary


class Callback:
    """Base class: every hook does nothing. `name` keys its checkpointed state."""

    name = "callback"

    def on_step_start(self, state: TrainState) -> None:
        pass

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        pass

    def on_validation(self, state: TrainState, val: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, state: TrainState) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def on_end(self, state: TrainState) -> None:
        pass


CallbackFactory = Callable[["Config"], "Callback | None"]
CALLBACKS: dict[str, CallbackFactory] = {}


def register_callback(name: str) -> Callable[[CallbackFactory], CallbackFactory]:
    def deco(factory: CallbackFactory) -> CallbackFactory:
        if name in CALLBACKS:
            raise KeyError(f"callback '{name}' registered twice")
        CALLBACKS[name] = factory
        return factory
    return deco


def _import_all() -> None:
    """Import every module of this package, so each registers its callbacks."""
    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def default_callbacks(cfg: Config) -> list[Callback]:
    """Every registered callback active for `cfg`, in registration order."""
    _import_all()
    out = []
    for name, factory in CALLBACKS.items():
        cb = factory(cfg)
        if cb is not None:
            cb.name = name
            out.append(cb)
    return out
