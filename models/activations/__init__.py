"""Elementwise activations, registered by name (`model.ffn.activation` for `mlp`; GLU gates).

Each entry is a factory `(hidden_dim, model_cfg, layer_idx) -> nn.Module`, so parametric
activations (PolyCom) and keyed ones (stochastic) fit the same slot as ReLU. A module with
`takes_context = True` is called as `act(u, ctx)` with the block's MixerContext (positions and
global sample indices); every other one as `act(u)` (see `activate`). A module with a
`relu_finetune` attribute is switched to ReLU by the Swi+FT / StochA+FT schedule
(train/callbacks/activation_schedule.py).

One technique per file: PolyReLU / PolyNorm in `polycom.py`, StochA in `stochastic.py`, the
switchable SiLU of the ReLU fine-tune in `relu_finetune.py`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from models.activations.relu_finetune import SiLU
from models.registry import ACTIVATIONS

if TYPE_CHECKING:
    from models.config import ModelConfig

ActivationFactory = Callable[[int, "ModelConfig | None", int], nn.Module]


class ReLU2(nn.Module):
    """Squared ReLU (Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


def _stateless(make: Callable[[], nn.Module]) -> ActivationFactory:
    """A factory for an activation that needs neither the width, the config nor the layer."""
    return lambda dim, cfg=None, layer_idx=0: make()


ACTIVATIONS.register("relu")(_stateless(nn.ReLU))
ACTIVATIONS.register("gelu")(_stateless(nn.GELU))                                   # exact (erf)
ACTIVATIONS.register("gelu_tanh")(_stateless(lambda: nn.GELU(approximate="tanh")))
ACTIVATIONS.register("silu")(_stateless(SiLU))                                      # switchable to ReLU
ACTIVATIONS.register("relu2")(_stateless(ReLU2))
ACTIVATIONS.register("sigmoid")(_stateless(nn.Sigmoid))
ACTIVATIONS.register("identity")(_stateless(nn.Identity))


def build_activation(name: str, dim: int, cfg: ModelConfig | None = None, layer_idx: int = 0) -> nn.Module:
    """The activation `name` for a hidden width `dim` in layer `layer_idx` (cfg: the model config)."""
    return ACTIVATIONS.get(name)(dim, cfg, layer_idx)


def activate(act: nn.Module, u: torch.Tensor, ctx: Any = None) -> torch.Tensor:
    """Apply `act` to u, passing the block context only to activations that take it."""
    return act(u, ctx) if getattr(act, "takes_context", False) else act(u)


from models.activations import polycom, stochastic  # noqa: E402,F401  (registration)
from models.activations.polycom import PolyNorm, PolyReLU  # noqa: E402
from models.activations.stochastic import StochasticActivation  # noqa: E402

__all__ = ["ACTIVATIONS", "PolyNorm", "PolyReLU", "ReLU2", "SiLU", "StochasticActivation", "activate",
           "build_activation"]
