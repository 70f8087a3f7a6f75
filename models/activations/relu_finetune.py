"""The ReLU fine-tune switch (Swi+FT / StochA+FT; "Stochastic activations", arXiv 2509.22358).

Activations that the schedule may switch carry a plain `relu_finetune` attribute: while it is
True they compute ReLU, in training and in eval. It is not a buffer and not saved: the
schedule (train/callbacks/activation_schedule.py) sets it from (step, config) before every step, so a
resumed run switches at the same step without any state.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiLU(nn.Module):
    """SiLU (Swish, beta=1) that becomes ReLU when `relu_finetune` is set (SwiGLU -> ReGLU gate)."""

    def __init__(self) -> None:
        super().__init__()
        self.relu_finetune = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x) if self.relu_finetune else F.silu(x)

    def extra_repr(self) -> str:
        return "relu_finetune=True" if self.relu_finetune else ""
