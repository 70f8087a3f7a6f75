"""Feed-forward blocks, registered by `model.ffn.kind`.

- `mlp`:          y = W2 act(W1 x)
- `glu`:          y = W2 (gate_act(x W_gate) * (x W_up)); W_in = [W_gate | W_up] is one matrix whose
                  first chunk is the gate (fixed convention, as Megatron / PolyCom's `swiglu`, so
                  checkpoints are unambiguous). Variants (Shazeer 2020): glu (sigmoid), bilinear
                  (identity), reglu (relu), geglu (exact erf GELU), swiglu (SiLU), and stochastic
                  (the StochA mix replaces SiLU in the gate: "Stochastic activations", arXiv 2509.22358).
- `fused_linear`: y = W x with one d x d matrix: the activation-free FFN W2 W1 collapsed
                  ("FuFFN": Jha & Reagen, "Entropy-Guided Attention for Private LLMs", arXiv 2501.03489), for the LN-free
                  softmax-only arms. Needs `activation: identity`.

`hidden: auto` widths are parameter-matched (models/widths.py): 4d for an ungated MLP, 8d/3 for
GLUs, 1.5 x the SwiGLU width for PolyCom activations. Every FFN (and memory layer) is called as
`(x, ctx)` with the block's MixerContext and hands it to activations that use it (stochastic
masks need the global sample index and positions).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from models.activations import activate, build_activation
from models.config import FFNConfig, ModelConfig
from models.registry import ACTIVATIONS, FFNS, ConfigError, suggest
from models.tags import tag_linear
from models.weight_norm import ffn_linear
from models.widths import glu_width, mlp_width

if TYPE_CHECKING:
    from models.context import MixerContext

# GLU variant -> the activation applied to the gate (Shazeer 2020; `stochastic`: StochA's gate).
GLU_GATES = {"glu": "sigmoid", "bilinear": "identity", "reglu": "relu", "geglu": "gelu", "swiglu": "silu",
             "stochastic": "stochastic"}


def _linear(cfg: ModelConfig, d_in: int, d_out: int) -> nn.Linear:
    """An FFN matrix, tagged; weight- or spectral-normalised with `model.ffn.weight_norm`."""
    layer = ffn_linear(cfg, d_in, d_out, cfg.ffn.bias)
    return layer if hasattr(layer, "param_tags") else tag_linear(layer)


class ScaledOutput(nn.Module):
    """`model.ffn.output_scale`: a learnable scalar s (init 1) on the FFN's output, y -> s y
    (Scaled-FFN, an LN-free stabilizer: "Entropy-Guided Attention for Private LLMs", arXiv
    2501.03489). Every FFN kind derives from this."""

    param_tags = {"output_scale": "scalar"}

    def _init_output_scale(self, cfg: ModelConfig) -> None:
        self.output_scale = nn.Parameter(torch.ones(())) if cfg.ffn.output_scale else None

    def scaled(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.output_scale is None else y * self.output_scale.to(y.dtype)

    def reset_parameters(self) -> None:
        if self.output_scale is not None:
            with torch.no_grad():
                self.output_scale.fill_(1.0)


@FFNS.register("mlp")
class MLP(ScaledOutput):
    # what reads the FFN-input norm, and the key that gives it a bias (models/norm_fold.py)
    norm_inputs = {"all": ("w1",)}
    norm_input_bias_keys = {"w1": "ffn.bias"}
    relu_finetune_activations = frozenset({"silu", "stochastic"})

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        hidden = self.hidden_width(cfg)
        self.hidden = hidden
        self.w1 = _linear(cfg, cfg.d_model, hidden)
        self.act = build_activation(cfg.ffn.activation, hidden, cfg, layer_idx)
        self.w2 = _linear(cfg, hidden, cfg.d_model)
        self.w2.is_residual_out = True
        self._init_output_scale(cfg)

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        """4d, or the activation's own parameter-matched rule (PolyCom: 1.5 x the SwiGLU width)."""
        if cfg.ffn.hidden != "auto":
            return cfg.ffn.hidden
        rule = getattr(ACTIVATIONS.get(cfg.ffn.activation), "auto_hidden", None)
        if rule is not None:
            return rule(cfg.d_model, cfg.ffn.multiple_of)
        return mlp_width(cfg.d_model, cfg.ffn.multiple_of)

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        if name in GLU_GATES and name not in ACTIVATIONS:
            raise ConfigError(key, f"'{name}' is a GLU variant: use model.ffn.kind: glu")
        ACTIVATIONS.check(name, key)

    def forward(self, x: torch.Tensor, ctx: MixerContext | None = None) -> torch.Tensor:
        return self.scaled(self.w2(activate(self.act, self.w1(x), ctx)))


@FFNS.register("glu")
class GLU(ScaledOutput):
    # what reads the FFN-input norm, and the key that gives it a bias (models/norm_fold.py)
    norm_inputs = {"all": ("w_in",)}
    norm_input_bias_keys = {"w_in": "ffn.bias"}
    relu_finetune_activations = frozenset({"swiglu", "stochastic"})

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        hidden = self.hidden_width(cfg)
        self.hidden = hidden
        self.w_in = _linear(cfg, cfg.d_model, 2 * hidden)
        self.act = build_activation(GLU_GATES[cfg.ffn.activation], hidden, cfg, layer_idx)
        self.w2 = _linear(cfg, hidden, cfg.d_model)
        self.w2.is_residual_out = True
        self._init_output_scale(cfg)

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        """Parameter-matched to the 4d MLP: 2/3 of 4d, rounded up to multiple_of."""
        if cfg.ffn.hidden != "auto":
            return cfg.ffn.hidden
        return glu_width(cfg.d_model, cfg.ffn.multiple_of)

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        if name not in GLU_GATES:
            raise ConfigError(key, f"unknown GLU variant '{name}'{suggest(name, list(GLU_GATES))}; "
                              f"available: {', '.join(GLU_GATES)}")

    def forward(self, x: torch.Tensor, ctx: MixerContext | None = None) -> torch.Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.scaled(self.w2(activate(self.act, gate, ctx) * up))


@FFNS.register("fused_linear")
class FusedLinearFFN(ScaledOutput):
    """FuFFN: y = W x, W = W2 W1 of an activation-free MLP, stored as one d x d matrix."""

    # what reads the FFN-input norm, and the key that gives it a bias (models/norm_fold.py)
    norm_inputs = {"all": ("w",)}
    norm_input_bias_keys = {"w": "ffn.bias"}

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.w = _linear(cfg, cfg.d_model, cfg.d_model)
        self.w.is_residual_out = True
        self._init_output_scale(cfg)

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        return cfg.d_model

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        if name != "identity":
            raise ConfigError(key, f"kind fused_linear has no activation: set it to identity (got '{name}')")

    @staticmethod
    def check_config(ffn: FFNConfig, path: str) -> None:
        if ffn.hidden != "auto":
            raise ConfigError(f"{path}.hidden", "kind fused_linear has no hidden layer: leave hidden at auto")

    @classmethod
    @torch.no_grad()
    def from_mlp(cls, mlp: MLP, cfg: ModelConfig) -> FusedLinearFFN:
        """Collapse an identity-activation MLP: W = W2 W1, b = W2 b1 + b2 (same function, d x d)."""
        if not isinstance(mlp.act, nn.Identity):
            raise ValueError("only an MLP with the identity activation is linear")
        fused = cls(cfg)
        fused.to(dtype=mlp.w1.weight.dtype, device=mlp.w1.weight.device)
        fused.w.weight.copy_(mlp.w2.weight @ mlp.w1.weight)
        if fused.w.bias is not None:
            b1 = mlp.w1.bias if mlp.w1.bias is not None else torch.zeros_like(mlp.w1.weight[:, 0])
            b2 = mlp.w2.bias if mlp.w2.bias is not None else torch.zeros_like(mlp.w2.weight[:, 0])
            fused.w.bias.copy_(mlp.w2.weight @ b1 + b2)
        return fused

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return self.scaled(self.w(x))


def build_ffn(cfg: ModelConfig, layer_idx: int = 0) -> nn.Module:
    return FFNS.get(cfg.ffn.kind)(cfg, layer_idx)
