"""PolyCom activations ("Polynomial Composition Activations", Zhuo et al., ICLR 2025, arXiv 2411.03884).

    PolyReLU(u) = w0 relu(u)^3 + w1 relu(u)^2 + w2 relu(u) + b
    PolyNorm(u) = w0 N(u^3)    + w1 N(u^2)    + w2 N(u)    + b,   N(z) = z rsqrt(mean(z^2) + eps)

with N's mean over the FFN hidden dimension, separately for each token. Order 3; w = 1/3 and
b = 0 at init; eps = 1e-6; four learnable scalars per FFN, tagged "scalar" (no weight decay).
Used in an ungated `mlp`, whose `hidden: auto` width is 1.5 x the SwiGLU width (models/widths.py),
the paper's parameter matching.

Numerics: powers, the RMS and the weight gradients are computed in fp32 (fp64 stays fp64) and
the output is cast back, so bf16 autocast does not lose precision on u^3. Both activations are
autograd Functions that save only u and recompute the powers in backward: no u^2 / u^3 tensors
are kept for backward (the reference recomputes them through torch.utils.checkpoint).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from models.registry import ACTIVATIONS
from models.widths import polycom_width

if TYPE_CHECKING:
    from models.config import ModelConfig

ORDER = 3
EPS = 1.0e-6


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _sum_to_scalar(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dtype=x.dtype)


class _PolyReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(u)
        r = torch.relu(u.to(dt))
        w, b = weight.to(dt), bias.to(dt)
        y = w[0] * r.pow(3) + w[1] * r.square() + w[2] * r + b
        ctx.save_for_backward(u, weight, bias)
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, weight, bias = ctx.saved_tensors
        dt = _compute_dtype(u)
        g = grad.to(dt)
        r = torch.relu(u.to(dt))
        w = weight.to(dt)
        r2 = r.square()
        grad_u = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # d/du = 3 w0 r^2 + 2 w1 r + w2 where u > 0, else 0 (relu'(0) = 0, as torch)
            slope = (3 * w[0] * r2 + 2 * w[1] * r + w[2]) * (r > 0)
            grad_u = (g * slope).to(u.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([_sum_to_scalar(g * r2 * r), _sum_to_scalar(g * r2),
                                  _sum_to_scalar(g * r)]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _sum_to_scalar(g).reshape(1).to(bias.dtype)
        return grad_u, grad_w, grad_b


def _rms_normalize(z: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(N(z), rsqrt(mean(z^2) + eps)) over the last dim."""
    s = torch.rsqrt(z.square().mean(-1, keepdim=True) + eps)
    return z * s, s


class _PolyNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        dt = _compute_dtype(u)
        uf = u.to(dt)
        w, b = weight.to(dt), bias.to(dt)
        u2 = uf.square()
        y = (w[0] * _rms_normalize(u2 * uf, eps)[0] + w[1] * _rms_normalize(u2, eps)[0]
             + w[2] * _rms_normalize(uf, eps)[0] + b)
        ctx.save_for_backward(u, weight, bias)
        ctx.eps = eps
        return y.to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, weight, bias = ctx.saved_tensors
        dt = _compute_dtype(u)
        g, uf, w = grad.to(dt), u.to(dt), weight.to(dt)
        u2 = uf.square()
        powers = (u2 * uf, u2, uf)                        # paired with w0, w1, w2
        normed = [_rms_normalize(z, ctx.eps) for z in powers]
        grad_u = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            # n = z s with s = (mean(z^2) + eps)^-1/2:  dL/dz = s (gn - n mean(gn n)),  gn = w g
            dz = [w[i] * s * (g - n * (g * n).mean(-1, keepdim=True)) for i, (n, s) in enumerate(normed)]
            grad_u = (dz[0] * 3 * u2 + dz[1] * 2 * uf + dz[2]).to(u.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = torch.stack([_sum_to_scalar(g * n) for n, _ in normed]).to(weight.dtype)
        if ctx.needs_input_grad[2]:
            grad_b = _sum_to_scalar(g).reshape(1).to(bias.dtype)
        return grad_u, grad_w, grad_b, None


class _PolyCom(nn.Module):
    """Shared parameters: `weight` (3,) for the cubic, square and linear terms; `bias` (1,)."""

    param_tags = {"weight": "scalar", "bias": "scalar"}

    def __init__(self, dim: int = 0, cfg: ModelConfig | None = None, layer_idx: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.full((ORDER,), 1.0 / ORDER))
        self.bias = nn.Parameter(torch.zeros(1))

    def reset_parameters(self) -> None:
        """w = 1/3 each, b = 0 (the reference's torch.ones(3) / 3 and torch.zeros(1))."""
        with torch.no_grad():
            self.weight.fill_(1.0 / ORDER)
            self.bias.zero_()

    @staticmethod
    def auto_hidden(d_model: int, multiple_of: int) -> int:
        """`hidden: auto` in an mlp: 1.5 x the SwiGLU width, the paper's parameter matching."""
        return polycom_width(d_model, multiple_of)


@ACTIVATIONS.register("polyrelu")
class PolyReLU(_PolyCom):
    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return _PolyReLUFn.apply(u, self.weight, self.bias)


@ACTIVATIONS.register("polynorm")
class PolyNorm(_PolyCom):
    def __init__(self, dim: int = 0, cfg: ModelConfig | None = None, layer_idx: int = 0, eps: float = EPS):
        super().__init__(dim, cfg, layer_idx)
        self.eps = eps

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return _PolyNormFn.apply(u, self.weight, self.bias, self.eps)
