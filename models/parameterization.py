"""Parameterizations (`model.param.kind`): init std, forward multipliers (residual branch,
input embedding, output logits) and the per-spec optimizer rules the group builder applies.

Only standard parameterization (SP) is registered here; muP and CompleteP register their own
rules in the same interface (models/protocols.py `Parameterization`), reading each parameter's
TagSpec (matrix, in_block, width_scaled), never its tag's name.
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

    def init_std(self, spec: TagSpec, residual_out: bool = False) -> float:
        std = self.cfg.init_std
        if residual_out and self.cfg.residual_init_scaling:
            std /= math.sqrt(2 * self.cfg.n_layers)
        return std

    def group_rule(self, spec: TagSpec) -> GroupRule:
        return GroupRule(wd_mult=1.0 if (spec.matrix and spec.in_block) else 0.0)


def build_parameterization(cfg: ModelConfig):
    return PARAMETERIZATIONS.get(cfg.param.kind, "model.param.kind")(cfg)
