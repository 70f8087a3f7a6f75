"""Dynamic Tanh, a drop-in for the norm slots: "Transformers without Normalization", Zhu, Chen,
He, LeCun, Liu, arXiv 2503.10622.

    DyT(x) = gamma * tanh(alpha * x) + beta

with one learnable scalar alpha per module (init 0.5, the paper's default alpha_0; it tunes
alpha_0 separately for its large language models) and per-channel gamma (ones) and beta (zeros).
No statistics are computed, so it costs one elementwise op; computed in fp32 like the norms.
"""
from __future__ import annotations

import torch
from torch import nn

from models.norms import compute_dtype
from models.registry import NORMS

ALPHA_INIT = 0.5


@NORMS.register("dyt")
class DyT(nn.Module):
    param_tags = {"weight": "norm_gain", "bias": "norm_bias", "alpha": "scalar"}

    def __init__(self, dim: int, eps: float = 1e-6):          # eps: the norm slot's signature; unused
        super().__init__()
        self.alpha = nn.Parameter(torch.full((), ALPHA_INIT))
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        y = torch.tanh(self.alpha.to(dt) * x.to(dt)) * self.weight.to(dt) + self.bias.to(dt)
        return y.to(x.dtype)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(ALPHA_INIT)
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
