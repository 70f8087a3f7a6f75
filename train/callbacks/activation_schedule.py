"""The ReLU fine-tune schedule (StochA+FT / Swi+FT; "Stochastic activations", arXiv 2509.22358), stateless.

With alpha = `model.ffn.relu_finetune_frac` > 0 and S = `train.steps`, the FFN activation is
switched to ReLU for every 0-based step s >= floor((1 - alpha) * S): the last ceil(alpha * S)
optimizer updates run ReLU (SiLU -> ReLU in an MLP, SwiGLU -> ReGLU gate, StochA -> ReLU),
and so do evaluation and the saved model after them. The switch step is computed in exact
decimal arithmetic (alpha as written in the config), so alpha = 0.1 with S = 10 switches at 9,
not at a float-rounded 8.

Nothing is stored: the `ActivationSchedule` callback calls `apply_activation_schedule(model, step,
cfg)` before each step's forward, so a resumed run (a freshly built model) switches at exactly
the same step.
If `train.steps` is changed on resume, the switch step moves with it, like the LR schedule.

The same call hands the step to stochastic activations, whose `call` granularity is keyed by it.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from torch import nn

from train.callbacks import Callback, TrainState, register_callback


def relu_switch_step(steps: int, frac: float) -> int | None:
    """First 0-based step that runs ReLU: floor((1 - frac) * steps); None when frac == 0."""
    if frac <= 0:
        return None
    alpha = Fraction(repr(float(frac)))        # the decimal as written, not its binary approximation
    return math.floor((1 - alpha) * steps)


def relu_finetune_active(step: int, cfg: Any) -> bool:
    """Whether 0-based step `step` of a run with config `cfg` runs the ReLU fine-tune."""
    switch = relu_switch_step(cfg.train.steps, cfg.model.ffn.relu_finetune_frac)
    return switch is not None and step >= switch


def apply_activation_schedule(model: nn.Module, step: int, cfg: Any) -> dict[str, Any] | None:
    """Set every switchable activation for 0-based step `step` (call before the step's forward).

    Works through DDP / FSDP / torch.compile wrappers (it walks `model.modules()`). Returns an
    `event` row for metrics.jsonl when the mode changed (the switch, or a resume after it),
    else None.
    """
    on = relu_finetune_active(step, cfg)
    changed = False
    for module in model.modules():
        if hasattr(module, "relu_finetune") and module.relu_finetune != on:
            module.relu_finetune = on
            changed = True
        if hasattr(module, "set_train_step"):
            module.set_train_step(step)
    if not changed:
        return None
    ffn = cfg.model.ffn
    return {"kind": "event", "event": "activation_switch", "step": step,
            "activation": "relu" if on else ffn.activation,
            "switch_step": relu_switch_step(cfg.train.steps, ffn.relu_finetune_frac)}


def apply_checkpoint_activation(model: nn.Module, checkpoint_step: int, cfg: Any) -> None:
    """For a model loaded from the checkpoint saved after `checkpoint_step` updates (eval, probes,
    generation): the activation its last update ran with, i.e. that of 0-based step
    checkpoint_step - 1 (what the trainer's own validation at that step used)."""
    apply_activation_schedule(model, max(checkpoint_step - 1, 0), cfg)


class ActivationSchedule(Callback):
    """Applies the schedule before every step and logs the switch as an event."""

    def on_step_start(self, state: TrainState) -> None:
        event = apply_activation_schedule(state.model, state.step, state.cfg)
        if event is not None:
            state.log(event)


@register_callback("activation_schedule")
def _activation_schedule(cfg: Any) -> ActivationSchedule | None:
    """Active when the FFN's activations can switch or are keyed by the step (stochastic)."""
    ffn = cfg.model.ffn
    return ActivationSchedule() if ffn.relu_finetune_frac > 0 or ffn.activation == "stochastic" else None
