"""When to checkpoint: every `checkpoint.every` steps (the final step and stops for requeue
are always saved by the trainer itself, since exact resume depends on them)."""
from __future__ import annotations

from typing import Any

from train.callbacks import Callback, TrainState, register_callback


class PeriodicCheckpoint(Callback):
    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if state.step % self.every == 0 and state.step < state.cfg.train.steps:
            state.request_checkpoint = True


@register_callback("checkpoint")
def _periodic(cfg: Any) -> PeriodicCheckpoint | None:
    return PeriodicCheckpoint(cfg.checkpoint.every) if cfg.checkpoint.every else None
