"""`model.ffn.weight_norm: spectral`: one power iteration per step for every spectrally normalised
FFN matrix (models/weight_norm.py), before the step's forward and without gradient, so the forward
(and an activation-checkpointing recomputation of it) only divides by the stored sigma. The
iterate and sigma are module buffers, so a checkpoint carries them and a resumed run continues
the iteration where it stopped."""
from __future__ import annotations

from typing import Any

from models.weight_norm import SpectralNormLinear
from train.callbacks import Callback, TrainState, register_callback


class SpectralNormIteration(Callback):
    def on_step_start(self, state: TrainState) -> None:
        for module in state.model.modules():
            if isinstance(module, SpectralNormLinear):
                module.power_iteration()


@register_callback("spectral_norm")
def _factory(cfg: Any) -> Callback | None:
    return SpectralNormIteration() if cfg.model.ffn.weight_norm == "spectral" else None
