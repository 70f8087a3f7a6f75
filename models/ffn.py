"""Feed-forward blocks, registered by `model.ffn.kind`.

- `mlp`:  y = W2 act(W1 x)
- `glu`:  y = W2 (act(x W_gate) * (x W_up)); W_in = [W_gate | W_up] is one matrix whose
  first chunk is the gate (fixed convention, so checkpoints are unambiguous).
"""
from __future__ import annotations

import torch
from torch import nn

from models.activations import build_activation
from models.config import ModelConfig
from models.registry import ACTIVATIONS, FFNS, ConfigError, suggest
from models.tags import tag_linear

# GLU variant -> the activation applied to the gate (Shazeer 2020).
GLU_GATES = {"glu": "sigmoid", "bilinear": "identity", "reglu": "relu", "geglu": "gelu", "swiglu": "silu"}


def _round_to_multiple(x: float, multiple: int) -> int:
    """Smallest multiple of `multiple` that is >= x."""
    n = -(-x // multiple)
    return int(n * multiple)


@FFNS.register("mlp")
class MLP(nn.Module):
    param_tags: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = self.hidden_width(cfg)
        self.w1 = tag_linear(nn.Linear(cfg.d_model, hidden, bias=cfg.ffn.bias))
        self.act = build_activation(cfg.ffn.activation, hidden)
        self.w2 = tag_linear(nn.Linear(hidden, cfg.d_model, bias=cfg.ffn.bias))
        self.w2.is_residual_out = True

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        if cfg.ffn.hidden != "auto":
            return cfg.ffn.hidden
        return _round_to_multiple(4 * cfg.d_model, cfg.ffn.multiple_of)

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        if name in GLU_GATES:
            raise ConfigError(key, f"'{name}' is a GLU variant: use model.ffn.kind: glu")
        ACTIVATIONS.check(name, key)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(self.act(self.w1(x)))


@FFNS.register("glu")
class GLU(nn.Module):
    param_tags: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = self.hidden_width(cfg)
        self.hidden = hidden
        self.w_in = tag_linear(nn.Linear(cfg.d_model, 2 * hidden, bias=cfg.ffn.bias))
        self.act = build_activation(GLU_GATES[cfg.ffn.activation], hidden)
        self.w2 = tag_linear(nn.Linear(hidden, cfg.d_model, bias=cfg.ffn.bias))
        self.w2.is_residual_out = True

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        """Parameter-matched to the 4d MLP: 2/3 of 4d, rounded up to multiple_of."""
        if cfg.ffn.hidden != "auto":
            return cfg.ffn.hidden
        return _round_to_multiple(8 * cfg.d_model / 3, cfg.ffn.multiple_of)

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        if name not in GLU_GATES:
            raise ConfigError(key, f"unknown GLU variant '{name}'{suggest(name, list(GLU_GATES))}; "
                              f"available: {', '.join(GLU_GATES)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w2(self.act(gate) * up)


def build_ffn(cfg: ModelConfig) -> nn.Module:
    return FFNS.get(cfg.ffn.kind)(cfg)
