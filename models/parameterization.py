"""Parameterizations (`model.param.kind`): init std, residual-branch multiplier and the
per-tag optimizer multipliers that the optimizer group builder applies.

Only standard parameterization (SP) is registered here; muP and CompleteP register their own
rules in the same interface (see docs/techniques.md section 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from models.config import ModelConfig
from models.registry import PARAMETERIZATIONS
from models.tags import HIDDEN_MATRIX


@dataclass
class GroupRule:
    """Multipliers on the base lr / weight decay / eps for one parameter tag."""

    lr_mult: float = 1.0
    wd_mult: float = 1.0
    eps_mult: float = 1.0


@PARAMETERIZATIONS.register("sp")
class StandardParam:
    """SP: every multiplier is 1; weight decay on hidden matrices only; optional GPT-2 residual init scaling."""

    def __init__(self, cfg: ModelConfig):
        self.cfg = cfg

    @property
    def residual_multiplier(self) -> float:
        return 1.0

    def init_std(self, tag: str, residual_out: bool = False) -> float:
        std = self.cfg.init_std
        if residual_out and self.cfg.residual_init_scaling:
            std /= math.sqrt(2 * self.cfg.n_layers)
        return std

    def group_rule(self, tag: str) -> GroupRule:
        return GroupRule(wd_mult=1.0 if tag == HIDDEN_MATRIX else 0.0)


def build_parameterization(cfg: ModelConfig):
    return PARAMETERIZATIONS.get(cfg.param.kind, "model.param.kind")(cfg)
