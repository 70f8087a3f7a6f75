"""Product-key memory layers (Memory+): "Memory Layers at Scale", Berges, Oguz et al., arXiv
2412.09764, after "Large Memory Layers with Product Keys", Lample et al., arXiv 1907.05242.

A memory layer replaces the FFN of the layers in `model.memory.layers`. Per token and head:

    q = W_q x + b_q, split in halves q1, q2 (k_dim / 2 each)
    s1 = q1 K1^T, s2 = q2 K2^T over each head's n sub-keys per half; top-knn of each
    candidate slot (i, j) scores s1_i + s2_j; top-knn of the knn^2 candidates, slot i * n + j
    w = softmax(scores) in fp32; bag = sum over heads and picks of w * V[slot]  (embedding_bag)
    out = W_out(bag * SiLU(W_s x))           (Memory+'s SiLU-gated projection)
    out = sigmoid(w_g x) * out               (optional, `gated`)

The global top-knn over all n^2 slots is found exactly from the two per-half top-knn lists (a
global winner's halves are each in their half's top-knn), so no tokens x n^2 score matrix is
ever formed; the value read is `F.embedding_bag(mode="sum", per_sample_weights=w)`.
`share_values: true`: one value table for every memory layer, owned by the decoder
(`Decoder.shared["memory"]`) and reached through the block context; keys and projections stay
per layer.

Init: sub-keys U(-1/sqrt(k_dim), 1/sqrt(k_dim)), values N(0, v_dim^-1/2), as the reference; the
projections are block matrices with the parameterization's std (so muP / CompleteP scale them).
Values are one optimizer group with base LR `model.memory.value_lr` (tag `memory_value`, role
table); sub-keys are `memory_key` (role fixed_weight: their fan-in k_dim does not grow with width).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.memory_sharded import column_sharded_bag, is_sharded, shard_columns
from models.parallel_plan import ParallelHint
from models.registry import MEMORIES
from models.tags import MEMORY_VALUE, TagSpec, register_tag, tag_linear

MEMORY_KEY = register_tag(TagSpec("memory_key", matrix=True, in_block=True, matmul=False, muon_ok=False,
                                  init="module", role="fixed_weight"))


def _normalize(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "rms":
        return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
    if kind == "l2":
        return F.normalize(t, dim=-1)
    return t


def product_key_topk(q: torch.Tensor, keys: torch.Tensor, knn: int, final: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The top `final` (default knn) slots of q against the product keys.

    q: (M, h, k_dim); keys: (h, 2, n, k_dim / 2) sub-key tables. Returns scores and slot
    indices i * n + j, each (M, h, final), best first. Exact (the global top over all n^2
    slots) when final <= knn, or when knn = n (every pair is a candidate); larger `final` with
    knn < n would miss winners, so it is refused. Only (M, h, n) and (M, h, knn^2) score
    tensors are formed."""
    final = knn if final is None else final
    n = keys.shape[2]
    if final > knn and knn < n:
        raise ValueError(f"final={final} > knn={knn} is exact only with knn = n (={n})")
    half = q.shape[-1] // 2
    s1 = torch.einsum("mhd,hnd->mhn", q[..., :half], keys[:, 0])
    s2 = torch.einsum("mhd,hnd->mhn", q[..., half:], keys[:, 1])
    v1, i1 = s1.topk(knn, dim=-1)
    v2, i2 = s2.topk(knn, dim=-1)
    pairs = (v1[..., :, None] + v2[..., None, :]).flatten(-2)           # (M, h, knn^2)
    scores, best = pairs.topk(final, dim=-1)
    slots = i1.gather(-1, best // knn) * n + i2.gather(-1, best % knn)
    return scores, slots


class ValueTable(nn.Module):
    """The memory's values, (n_keys^2, v_dim): per layer, or shared by every memory layer. Under
    FSDP2 it shards itself by columns over the data-parallel ranks (models/memory_sharded.py)
    instead of being all-gathered whole around every forward."""

    param_tags = {"weight": MEMORY_VALUE.name}
    parallel_hint = ParallelHint(shard_self=True)

    def shard(self, mesh: Any) -> None:
        """Called by apply_parallelism (train/parallel.py) before fully_shard."""
        shard_columns(self, mesh)

    def __init__(self, slots: int, v_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(slots, v_dim))

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.normal_(0.0, self.weight.shape[1] ** -0.5)


def _v_dim(cfg: ModelConfig) -> int:
    return cfg.memory.v_dim or cfg.d_model


@MEMORIES.register("product_key")
class ProductKeyMemory(nn.Module):
    param_tags = {"keys": MEMORY_KEY.name}
    norm_inputs = {"all": ("wq", "w_s", "gate")}   # what reads the FFN-input norm (models/norm_fold.py)

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        m = cfg.memory
        self.heads, self.k_dim, self.n, self.knn, self.qk_norm = m.heads, m.k_dim, m.n_keys, m.knn, m.qk_norm
        v_dim = _v_dim(cfg)
        self.wq = tag_linear(nn.Linear(cfg.d_model, m.heads * m.k_dim, bias=True))
        self.keys = nn.Parameter(torch.empty(2 * m.heads * m.n_keys, m.k_dim // 2))
        self.values = None if m.share_values else ValueTable(m.n_keys ** 2, v_dim)
        self.w_s = tag_linear(nn.Linear(cfg.d_model, v_dim, bias=True))
        self.w_out = tag_linear(nn.Linear(v_dim, cfg.d_model, bias=True))
        self.w_out.is_residual_out = True
        self.gate = tag_linear(nn.Linear(cfg.d_model, 1, bias=False)) if m.gated else None

    def reset_parameters(self) -> None:
        bound = self.k_dim ** -0.5
        with torch.no_grad():
            self.keys.uniform_(-bound, bound)

    @staticmethod
    def build_shared(cfg: ModelConfig) -> nn.Module | None:
        """The decoder-owned value table when `share_values` is on."""
        return ValueTable(cfg.memory.n_keys ** 2, _v_dim(cfg)) if cfg.memory.share_values else None

    @staticmethod
    def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
        """Training FLOPs (fwd + bwd, x3) beyond the projections' matmuls (counted as parameters):
        sub-key scores 2 h n k_dim and the weighted bag read 2 h knn v_dim."""
        m = cfg.memory
        return 3.0 * (2 * m.heads * m.n_keys * m.k_dim + 2 * m.heads * m.knn * _v_dim(cfg))

    def value_table(self, ctx: Any) -> torch.Tensor:
        if self.values is not None:
            return self.values.weight
        return ctx.shared["memory"].weight

    def forward(self, x: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        B, T, d = x.shape
        q = self.wq(x).view(B * T, self.heads, self.k_dim)
        keys = self.keys.view(self.heads, 2, self.n, self.k_dim // 2)
        if self.qk_norm != "none":          # each half is scored against its own sub-keys
            half = self.k_dim // 2
            q = torch.cat([_normalize(q[..., :half], self.qk_norm), _normalize(q[..., half:], self.qk_norm)], -1)
            keys = _normalize(keys, self.qk_norm)
        scores, slots = product_key_topk(q, keys.to(q.dtype), self.knn)
        values = self.value_table(ctx)
        # softmax in fp32 (fp64 stays fp64), cast to the table's dtype for the weighted read
        weights = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(values.dtype)
        slots, weights = slots.reshape(B * T, -1), weights.reshape(B * T, -1)
        if is_sharded(values):       # FSDP2: this rank holds a block of columns of every slot
            bag = column_sharded_bag(slots, weights, values).to(x.dtype)
        else:
            bag = F.embedding_bag(slots, values, per_sample_weights=weights, mode="sum").to(x.dtype)
        out = self.w_out(bag.view(B, T, -1) * F.silu(self.w_s(x)))
        if self.gate is not None:
            out = torch.sigmoid(self.gate(x)) * out
        return out
