"""Pre-norm residual block: h += m * mixer(norm(h)); h += m * ffn(norm(h)).

Slot modules return a tensor or (tensor, Aux); the block always returns (h, Aux) with the
mixer's and the FFN's side outputs merged. Under `model.norm.removal` the norms are removable
(models/norm_removal.py) and read the context's position kinds; a mixer that takes a separate
value input (`takes_value_input`: attention) gets its own copy of the input norm for the v path,
initialised from the q/k one by `init_from` (the `checkpoint_aliases` below).
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.context import Aux, MixerContext, merge_aux, split_output
from models.ffn import build_ffn
from models.norm_removal import RemovableNorm
from models.norms import build_norm
from models.registry import MEMORIES, MIXERS


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, residual_multiplier: float = 1.0):
        super().__init__()
        self.layer_idx = layer_idx
        letter = cfg.layers.letters(cfg.n_layers)[layer_idx]
        mixer_cfg = cfg.layers.mixers[letter]
        self.removable = cfg.norm.removal is not None

        def norm() -> nn.Module:
            if self.removable:
                return RemovableNorm(cfg.norm.block, cfg.d_model, cfg.norm.eps)
            return build_norm(cfg.norm.block, cfg.d_model, cfg.norm.eps)

        self.mixer_norm = norm()
        self.mixer = MIXERS.get(mixer_cfg.kind)(cfg, mixer_cfg, layer_idx)
        self.mixer_norm_v = None
        if self.removable and getattr(self.mixer, "takes_value_input", False):
            self.mixer_norm_v = norm()
            self.checkpoint_aliases = {f"mixer_norm_v.{p}": f"mixer_norm.{p}"
                                       for p, _ in self.mixer_norm_v.named_parameters()}
        self.ffn_norm = norm()
        if layer_idx in cfg.memory.layers:
            self.ffn = MEMORIES.get(cfg.memory.kind)(cfg, layer_idx)
        else:
            self.ffn = build_ffn(cfg, layer_idx)
        # CompleteP sets this to L_base / L; a plain attribute, not a parameter.
        self.residual_multiplier = residual_multiplier

    def forward(self, h: torch.Tensor, ctx: MixerContext, cache=None) -> tuple[torch.Tensor, Aux]:
        m = self.residual_multiplier
        extra = {} if self.mixer_norm_v is None else {"value_input": self._norm(self.mixer_norm_v, h, ctx)}
        a, mixer_aux = split_output(self.mixer(self._norm(self.mixer_norm, h, ctx), ctx, cache, **extra))
        h = h + (a if m == 1.0 else m * a)
        f, ffn_aux = split_output(self.ffn(self._norm(self.ffn_norm, h, ctx), ctx))
        return h + (f if m == 1.0 else m * f), merge_aux(mixer_aux, ffn_aux)

    def _norm(self, norm: nn.Module, h: torch.Tensor, ctx: MixerContext) -> torch.Tensor:
        """A removable norm also reads the position kinds."""
        return norm(h, ctx.norm_kinds) if self.removable else norm(h)
