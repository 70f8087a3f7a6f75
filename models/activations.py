"""Elementwise activations, registered by name (`model.ffn.activation` for `mlp`).

Each entry is a factory `(hidden_dim) -> nn.Module`, so parametric activations (PolyCom) and
stateful ones (stochastic) fit the same slot as ReLU.
"""
from __future__ import annotations

import torch
from torch import nn

from models.registry import ACTIVATIONS


class ReLU2(nn.Module):
    """Squared ReLU (Primer)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x).square()


ACTIVATIONS.register("relu")(lambda dim: nn.ReLU())
ACTIVATIONS.register("gelu")(lambda dim: nn.GELU())
ACTIVATIONS.register("gelu_tanh")(lambda dim: nn.GELU(approximate="tanh"))
ACTIVATIONS.register("silu")(lambda dim: nn.SiLU())
ACTIVATIONS.register("relu2")(lambda dim: ReLU2())
ACTIVATIONS.register("sigmoid")(lambda dim: nn.Sigmoid())
ACTIVATIONS.register("identity")(lambda dim: nn.Identity())


def build_activation(name: str, dim: int) -> nn.Module:
    return ACTIVATIONS.get(name)(dim)
