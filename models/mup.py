"""muP and CompleteP: hyperparameters that transfer across width (muP) and depth (CompleteP).

muP ("Tensor Programs V", Yang et al., arXiv 2203.03466) scales init, learning rates and the
output logits with the width multiplier m_N = d_model / base_width, so the optimal learning rate
found at the base width holds at any width. CompleteP ("Don't be lazy: CompleteP enables
compute-efficient deep transformers", Dey et al., arXiv 2505.01618) adds the depth multiplier
m_L = n_layers / base_depth with exponent alpha (1: CompleteP, 0.5: depth-muP): every residual
branch is scaled by m_L^-alpha and learning rates, weight decay and AdamW epsilon follow.

Rules per TagSpec role (AdamW; sigma = model.init_std, eta = optim.lr, lambda = weight decay,
epsilon = optim.eps):

| role          | init std       | lr multiplier              | wd multiplier | under kind       |
|---------------|----------------|----------------------------|---------------|------------------|
| embedding     | sigma          | 1                          | 0             | mup, completep   |
| hidden_weight | sigma/sqrt(mN) | 1/mN                       | 1             | mup              |
| hidden_weight | sigma/sqrt(mN) | 1/mN * mL^(alpha-1)        | mN            | completep        |
| fixed_weight  | (its own)      | 1  (completep: mL^(a-1))   | 1             |                  |
| hidden_bias   | (its own)      | 1  (completep: mL^(a-1))   | 0             |                  |
| hidden_norm   | (its own)      | 1  (completep: mL^(a-1))   | 0             |                  |
| final_norm    | (its own)      | 1                          | 0             |                  |
| readout       | sigma          | 1                          | 0             |                  |
| table         | (its own)      | value_lr (x mL^(a-1))      | 1             |                  |

Forward multipliers: input (embeddings) x input_mult; output (before the LM head) x
output_mult / mN; every block branch x mL^-alpha (completep); attention logits x
sqrt(d_base) / d_h with d_base = base_width / n_heads (`attn_scale: linear`, the kind's
default), equal to 1/sqrt(d_h) at the base shape. AdamW epsilon x 1/(mN mL^alpha) under
completep, for every group (`eps_scope: global`, as the reference code; the paper words it
for the residual blocks: `eps_scope: hidden`); muP leaves epsilon alone.

Choices where the paper, the third-party tables and the reference code (nanoGPT-mup, branch
completep) differ, taken from the code: under muP weight decay and epsilon are not scaled; no
GPT-2 1/sqrt(2L) init factor (`model.residual_init_scaling` is refused); embeddings keep SP's
weight decay of 0 (the reference decays them), so that at the base shape both kinds are
bit-identical to SP; a learnable scalar in a block follows the hidden-bias rule; a lookup table
(memory values) is not width-scaled (a table row is read, not multiplied over d) but follows
the depth rule like every block parameter.
"""
from __future__ import annotations

import math

from models.config import ModelConfig
from models.parameterization import GroupRule, attention_scale
from models.registry import PARAMETERIZATIONS
from models.tags import TagSpec

BLOCK_ROLES = ("fixed_weight", "hidden_bias", "hidden_norm", "table")


@PARAMETERIZATIONS.register("mup")
class MuP:
    """Width transfer (alpha has no meaning here: depth is not scaled)."""

    default_alpha: float | None = None
    default_attn_scale = "linear"

    def __init__(self, cfg: ModelConfig):
        p = cfg.param
        self.cfg = cfg
        self.m_n = cfg.d_model / p.base_width
        self.m_l = cfg.n_layers / p.base_depth
        self.alpha = p.alpha if p.alpha is not None else self.default_alpha
        self.attn_scale = p.attn_scale or self.default_attn_scale

    # -- forward multipliers ----------------------------------------------------------------
    @property
    def residual_multiplier(self) -> float:
        return 1.0

    @property
    def input_multiplier(self) -> float:
        return self.cfg.param.input_mult

    @property
    def output_multiplier(self) -> float:
        return self.cfg.param.output_mult / self.m_n

    def attention_scale(self, head_dim: int) -> float | None:
        return attention_scale(self.attn_scale, head_dim, self.cfg.param.base_width / self.cfg.n_heads)

    # -- init and optimizer ------------------------------------------------------------------
    def init_std(self, spec: TagSpec, residual_out: bool = False) -> float:
        std = self.cfg.init_std
        return std / math.sqrt(self.m_n) if spec.role == "hidden_weight" else std

    def lr_mult(self, spec: TagSpec) -> float:
        return 1.0 / self.m_n if spec.role == "hidden_weight" else 1.0

    def wd_mult(self, spec: TagSpec) -> float:
        return 1.0 if spec.role in ("hidden_weight", "fixed_weight", "table") else 0.0

    def eps_mult(self, spec: TagSpec) -> float:
        return 1.0

    def group_rule(self, spec: TagSpec) -> GroupRule:
        if spec.role is None:
            raise KeyError(f"tag '{spec.name}' has no role: {type(self).__name__} has no rule for it "
                           "(give its TagSpec a role, see models/tags.py ROLES)")
        lr = self.cfg.memory.value_lr * self.lr_mult(spec) if spec.role == "table" else None   # its own base LR
        return GroupRule(lr_mult=self.lr_mult(spec), wd_mult=self.wd_mult(spec), eps_mult=self.eps_mult(spec), lr=lr)


@PARAMETERIZATIONS.register("completep")
class CompleteP(MuP):
    """Width and depth transfer; alpha 1 is CompleteP, 0.5 depth-muP."""

    default_alpha = 1.0

    @property
    def residual_multiplier(self) -> float:
        return self.m_l ** -self.alpha

    def lr_mult(self, spec: TagSpec) -> float:
        depth = self.m_l ** (self.alpha - 1.0)
        if spec.role == "hidden_weight":
            return depth / self.m_n
        return depth if spec.role in BLOCK_ROLES else 1.0

    def wd_mult(self, spec: TagSpec) -> float:
        if spec.role == "hidden_weight":
            return self.m_n
        return 1.0 if spec.role in ("fixed_weight", "table") else 0.0

    def eps_mult(self, spec: TagSpec) -> float:
        if self.cfg.param.eps_scope == "hidden" and not spec.in_block:
            return 1.0
        return 1.0 / (self.m_n * self.m_l ** self.alpha)

