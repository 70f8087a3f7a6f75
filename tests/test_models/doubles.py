"""Registered test doubles for the slot contracts: a mixer whose parameters have their own
inits (a stock nn.LayerNorm, a depthwise nn.Conv1d, a per-head gain), that returns an
auxiliary loss and a statistic and counts its forwards; and a memory layer with a value table.

`registered(...)` puts them in the registries for one test and takes them out afterwards, so
tests that walk the registries elsewhere never see them.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from models import registry
from models.context import Aux, LossTerm
from models.tags import MEMORY_VALUE, TagSpec, register_tag, tag_linear

CONV = register_tag(TagSpec("test_conv", matrix=False, in_block=True, matmul=False, muon_ok=False, init="module",
                            role="hidden_bias"))
STOCK_NORM = register_tag(TagSpec("test_stock_norm", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                  init="module", role="hidden_norm"))
HEAD_GAIN = register_tag(TagSpec("test_head_gain", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                 init="module", role="hidden_norm"))


@dataclass
class DoubleMixerConfig:
    kind: str = "test_double"
    aux_weight: float = 0.01


class DoubleMixer(nn.Module):
    """y = wo(gain * conv(ln(wq x))) per head; aux loss `test_aux` = weight * mean(y^2) (mean)."""

    forwards: dict[int, int] = {}          # layer -> forward calls (recomputation counts too)

    def __init__(self, cfg: Any, mixer_cfg: DoubleMixerConfig, layer_idx: int):
        super().__init__()
        d, self.h = cfg.d_model, cfg.n_heads
        self.layer_idx, self.aux_weight = layer_idx, mixer_cfg.aux_weight
        self.wq = tag_linear(nn.Linear(d, d, bias=False))
        self.ln = nn.LayerNorm(d)
        self.ln.param_tags = {"weight": STOCK_NORM.name, "bias": STOCK_NORM.name}
        self.conv = nn.Conv1d(d, d, kernel_size=4, groups=d, padding=3, bias=False)
        self.conv.param_tags = {"weight": CONV.name}
        self.gain = nn.Parameter(torch.empty(self.h, d // self.h))
        self.wo = tag_linear(nn.Linear(d, d, bias=False))
        self.wo.is_residual_out = True

    param_tags = {"gain": HEAD_GAIN.name}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gain.fill_(0.5)

    def new_cache(self) -> None:
        return None

    @staticmethod
    def flops_per_token(cfg: Any, mixer_cfg: Any, seq_len: int) -> float:
        return 0.0

    kernel = "torch"

    def forward(self, x: torch.Tensor, ctx: Any, cache: Any = None) -> tuple[torch.Tensor, Aux]:
        DoubleMixer.forwards[self.layer_idx] = DoubleMixer.forwards.get(self.layer_idx, 0) + 1
        B, T, d = x.shape
        u = self.ln(self.wq(x))
        u = self.conv(u.transpose(1, 2))[..., :T].transpose(1, 2)          # causal depthwise conv
        u = (u.view(B, T, self.h, -1) * self.gain).reshape(B, T, d)
        y = self.wo(u)
        stats = {"test_rms": y.pow(2).mean().sqrt().detach()} if ctx.want_stats else {}
        return y, Aux({"test_aux": LossTerm(self.aux_weight * y.float().pow(2).mean(), "mean")}, stats)


class DoubleMemory(nn.Module):
    """Soft lookup over a small learned table: y = softmax(x K^T) V (V tagged memory_value)."""

    def __init__(self, cfg: Any, layer_idx: int):
        super().__init__()
        self.keys = nn.Parameter(torch.empty(16, cfg.d_model))
        self.values = nn.Parameter(torch.empty(16, cfg.d_model))
        self.param_tags = {"keys": "hidden_matrix", "values": MEMORY_VALUE.name}

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.values.normal_(0.0, self.values.shape[1] ** -0.5)

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return torch.softmax(x @ self.keys.t(), dim=-1) @ self.values


@contextlib.contextmanager
def registered(mixer: bool = True, memory: bool = False) -> Iterator[None]:
    """Register the doubles (`test_double` mixer, `test_memory` memory layer) for a test."""
    added = []
    try:
        if mixer:
            registry.MIXERS.register("test_double", config=DoubleMixerConfig)(DoubleMixer)
            added.append((registry.MIXERS, "test_double"))
        if memory:
            registry.MEMORIES.register("test_memory")(DoubleMemory)
            added.append((registry.MEMORIES, "test_memory"))
        DoubleMixer.forwards.clear()
        yield
    finally:
        for reg, name in added:
            del reg._items[name]
            del reg._configs[name]
