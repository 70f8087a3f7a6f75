"""TTT-MLP's inner base-LR warm-up, driven by the trainer's step and stateless.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States" (arXiv
2407.04620): the released TTT-MLP scripts use an inner base LR of 0.1, warmed up linearly from
0.01. A TTT mixer with `base_lr_warmup_steps` > 0 takes

    base_lr(s) = start + (base_lr - start) * min(s / base_lr_warmup_steps, 1)

for 0-based step s. Nothing is stored: the callback sets it from `state.step` before every
step's forward, so a resumed run (a freshly built model) continues the ramp exactly. Without the
callback a mixer stays at the step it was last given (0 when fresh); the activation schedule's
`apply_checkpoint_activation` also hands modules the checkpoint's step (`set_train_step`).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from train.callbacks import Callback, TrainState, register_callback


def apply_ttt_schedule(model: nn.Module, step: int) -> None:
    """Set every TTT mixer's base LR for 0-based step `step` (through wrappers: model.modules())."""
    from models.mixers.ttt import TTT
    for module in model.modules():
        if isinstance(module, TTT):
            module.set_train_step(step)


class TTTSchedule(Callback):
    """Applies the warm-up before every step."""

    def on_step_start(self, state: TrainState) -> None:
        apply_ttt_schedule(state.model, state.step)


@register_callback("ttt_schedule")
def _ttt_schedule(cfg: Any) -> TTTSchedule | None:
    """Active when a layer pattern uses a TTT mixer with a warm-up."""
    mixers = cfg.model.layers.mixers.values()
    on = any(getattr(m, "kind", "").startswith("ttt_") and getattr(m, "base_lr_warmup_steps", 0) > 0 for m in mixers)
    return TTTSchedule() if on else None
