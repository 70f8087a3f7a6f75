"""`model.ffn.weight_norm`: weight or spectral normalisation of the FFN matrices, LN-free
stabilizers compared in "Entropy-Guided Attention for Private LLMs" (Jha & Reagen, arXiv
2501.03489; weight normalisation: Salimans & Kingma, arXiv 1602.07868; spectral normalisation:
Miyato et al., arXiv 1802.05957).

- `weight`: W = g * v / ||v|| per output row. g is initialised to the row norms of the initial v,
  so the initial W is the plain init (as torch's weight_norm does), through `derived_init`.
- `spectral`: W = v / sigma, sigma the largest singular value of v estimated by power iteration.
  The iteration runs once per step, before the step's forward, in a callback
  (train/callbacks/spectral_norm.py), without gradient; the forward only divides by the stored
  sigma, so an activation-checkpointing recomputation sees the same W / sigma. `u` and `sigma`
  are buffers, saved in checkpoints.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.tags import TagSpec, register_tag

WN_GAIN = register_tag(TagSpec("weight_norm_gain", matrix=False, in_block=True, matmul=False, muon_ok=False,
                               init="module", role="hidden_norm"))


class WeightNormLinear(nn.Linear):
    """y = x (g v / ||v||_row)^T + b."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.gain = nn.Parameter(torch.ones(out_features))

    def normalized_weight(self) -> torch.Tensor:
        v = self.weight
        return v * (self.gain / v.norm(dim=1)).to(v.dtype)[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.normalized_weight(), self.bias)

    def reset_parameters(self) -> None:            # the stand-in value; derived_init sets the real one
        if hasattr(self, "gain"):
            with torch.no_grad():
                self.gain.fill_(1.0)
        else:
            super().reset_parameters()

    def derived_init(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """g = ||v|| per row of the initial v, so that the initial W equals the plain init."""
        return {"gain": full["weight"].norm(dim=1)} if "weight" in full and "gain" in full else {}


class SpectralNormLinear(nn.Linear):
    """y = x (v / sigma)^T + b, sigma from `power_iteration()` (once per step, no gradient)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__(in_features, out_features, bias=bias)
        self.register_buffer("u", torch.full((out_features,), out_features ** -0.5))
        self.register_buffer("sigma", torch.ones(()))

    def reset_buffers(self) -> None:
        """The power iteration's start (called by the decoder's init, also after a meta build)."""
        with torch.no_grad():
            self.u.fill_(self.u.shape[0] ** -0.5)
            self.sigma.fill_(1.0)

    @torch.no_grad()
    def power_iteration(self, steps: int = 1) -> float:
        """sigma <- u^T W v after `steps` rounds of v = W^T u / |.|, u = W v / |.| (full W under FSDP)."""
        w = self.weight
        w = (w.full_tensor() if hasattr(w, "full_tensor") else w).float()
        u = self.u.float()
        for _ in range(steps):
            v = F.normalize(w.t() @ u, dim=0)
            u = F.normalize(w @ v, dim=0)
        self.u.copy_(u)
        self.sigma.copy_(u @ w @ v)
        return float(self.sigma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight / self.sigma.to(self.weight.dtype), self.bias)


def ffn_linear(cfg: Any, in_features: int, out_features: int, bias: bool) -> nn.Linear:
    """An FFN matrix: nn.Linear, or its weight- / spectral-normalised form (`model.ffn.weight_norm`)."""
    kind = cfg.ffn.weight_norm
    cls = {"none": nn.Linear, "weight": WeightNormLinear, "spectral": SpectralNormLinear}[kind]
    layer = cls(in_features, out_features, bias=bias)
    if kind == "weight":
        layer.param_tags = {"weight": "hidden_matrix", "bias": "hidden_bias", "gain": WN_GAIN.name}
    return layer
