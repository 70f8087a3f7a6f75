"""Parameterizations (`model.param.kind`): init std, forward multipliers (residual branch,
input embedding, output logits) and the per-spec optimizer rules the group builder applies.

Standard parameterization (SP) is registered here; muP and CompleteP (models/mup.py) register
their own rules in the same interface (models/protocols.py `Parameterization`), reading each
parameter's TagSpec role, never its tag's name.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.registry import PARAMETERIZATIONS
from models.tags import TagSpec


@dataclass
class GroupRule:
    """Multipliers on the base lr / weight decay / eps for one parameter spec.

    `lr`: an absolute peak learning rate that replaces optim.lr * lr_mult (e.g. a memory value
    table's fixed base LR); the schedule factor still multiplies it."""

    lr_mult: float = 1.0
    wd_mult: float = 1.0
    eps_mult: float = 1.0
    lr: float | None = None


@PARAMETERIZATIONS.register("sp")
class StandardParam:
    """SP: every multiplier is 1; weight decay on hidden matrices only; optional GPT-2 residual init scaling."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @property
    def residual_multiplier(self) -> float:
        return 1.0

    @property
    def input_multiplier(self) -> float:
        return 1.0

    @property
    def output_multiplier(self) -> float:
        return 1.0

    def attention_scale(self, head_dim: int) -> float | None:
        return attention_scale(self.cfg.param.attn_scale or "sqrt", head_dim, self.cfg.param.base_width / self.cfg.n_heads)

    def init_std(self, spec: TagSpec, residual_out: bool = False) -> float:
        std = self.cfg.init_std
        if residual_out and self.cfg.residual_init_scaling:
            std /= math.sqrt(2 * self.cfg.n_layers)
        return std

    def group_rule(self, spec: TagSpec) -> GroupRule:
        """Weight decay on block matrices (hidden and fixed weights, tables) only; a table (memory
        values) has its own base LR, model.memory.value_lr; every other lr and eps as set."""
        if spec.role is None:
            raise KeyError(f"tag '{spec.name}' has no role: SP has no rule for it (see models/tags.py ROLES)")
        wd = 1.0 if spec.role in ("hidden_weight", "fixed_weight", "table") else 0.0
        return GroupRule(wd_mult=wd, lr=self.cfg.memory.value_lr if spec.role == "table" else None)


def attention_scale(kind: str, head_dim: int, base_head_dim: float) -> float | None:
    """The attention logit scale: None (SDPA's own 1/sqrt(d_h)) for `sqrt`; for `linear`
    sqrt(d_base)/d_h, i.e. 1/d_h up to the constant that makes it 1/sqrt(d_h) at the base head
    dim d_base = base_width / n_heads (None there, so the base shape computes exactly what the
    default computes)."""
    if kind == "sqrt" or head_dim == base_head_dim:
        return None
    return math.sqrt(base_head_dim) / head_dim


def build_parameterization(cfg: ModelConfig):
    return PARAMETERIZATIONS.get(cfg.param.kind, "model.param.kind")(cfg)
