"""Normalization layers, registered by name (`model.norm.block`, `model.norm.final`).

Statistics are computed in fp32 and cast back, so bf16 autocast does not change them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.registry import NORMS


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for bf16/fp16 inputs, the input's own dtype for fp32/fp64 (float64 tests stay exact)."""
    return torch.promote_types(x.dtype, torch.float32)


@NORMS.register("rmsnorm")
class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * g."""

    param_tags = {"weight": "norm_gain"}

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        xf = x.to(dt)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(dt)).to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


@NORMS.register("layernorm")
class LayerNorm(nn.Module):
    """Standard LayerNorm with gain and bias, in fp32."""

    param_tags = {"weight": "norm_gain", "bias": "norm_bias"}

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        y = F.layer_norm(x.to(dt), x.shape[-1:], self.weight.to(dt), self.bias.to(dt), self.eps)
        return y.to(x.dtype)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)


@NORMS.register("none")
class NoNorm(nn.Module):
    """The identity: the LN-free mode's placeholder in the norm slot."""

    param_tags: dict[str, str] = {}

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def reset_parameters(self) -> None:
        pass


def build_norm(name: str, dim: int, eps: float) -> nn.Module:
    return NORMS.get(name)(dim, eps)
