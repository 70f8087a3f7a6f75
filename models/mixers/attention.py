"""Causal softmax attention through F.scaled_dot_product_attention.

RoPE, grouped-query attention (n_kv_heads < n_heads), optional QK-norm, optional sliding window,
optional intra-document masking, and a KV cache for incremental decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.context import MixerContext
from models.norms import RMSNorm
from models.parameterization import build_parameterization
from models.registry import MIXERS
from models.rope import apply_rope
from models.schema import require
from models.tags import tag_linear


@dataclass
class AttentionConfig:
    kind: str = "attention"     # the mixer kind (a registered MIXERS name)
    window: int | None = None   # sliding window: a query sees itself and the window-1 tokens before it

    def validate(self, path: str) -> None:
        if self.window is not None:
            require(self.window >= 1, f"{path}.window", f"must be >= 1 or null, got {self.window}")


class KVCache:
    """Keys and values seen so far, (B, H_kv, S, Dh) each."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v


def attention_mask(q_len: int, k_len: int, window: int | None, device: torch.device,
                   doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask (True = may attend), (q_len, k_len) or (B, 1, q_len, k_len) with doc ids.

    Queries are the last q_len of the k_len positions (k_len > q_len while decoding).
    """
    qi = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    kj = torch.arange(k_len, device=device)[None, :]
    mask = kj <= qi
    if window is not None:
        mask = mask & (qi - kj < window)
    if doc_ids is not None:
        same = doc_ids[:, -q_len:, None] == doc_ids[:, None, :]
        mask = (mask[None] & same)[:, None]
    return mask


@MIXERS.register("attention", config=AttentionConfig)
class Attention(nn.Module):
    param_tags: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig, mixer_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.window = mixer_cfg.window
        self.doc_mask = cfg.doc_mask
        d, dh = cfg.d_model, cfg.head_dim
        self.wq = tag_linear(nn.Linear(d, self.n_heads * dh, bias=False))
        self.wk = tag_linear(nn.Linear(d, self.n_kv_heads * dh, bias=False))
        self.wv = tag_linear(nn.Linear(d, self.n_kv_heads * dh, bias=False))
        self.wo = tag_linear(nn.Linear(self.n_heads * dh, d, bias=False))
        self.wo.is_residual_out = True
        self.scale = build_parameterization(cfg).attention_scale(dh)   # None: 1/sqrt(dh)
        self.q_norm = RMSNorm(dh, cfg.norm.eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.norm.eps) if cfg.qk_norm else None

    def new_cache(self) -> KVCache:
        return KVCache()

    @property
    def kernel(self) -> str:
        """sdpa_causal: SDPA's own causal path; sdpa_mask: SDPA with a dense (T, T) mask (window, doc_mask)."""
        return "sdpa_mask" if (self.window is not None or self.doc_mask) else "sdpa_causal"

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[2]
        doc_ids = ctx.doc_ids if (self.doc_mask and cache is None) else None
        if S == T and self.window is None and doc_ids is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            mask = attention_mask(T, S, self.window, x.device, doc_ids)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))

    @staticmethod
    def flops_per_token(cfg: ModelConfig, mixer_cfg: AttentionConfig, seq_len: int) -> float:
        """Score and value matmuls (fwd+bwd), beyond the projections: 12 d x mean keys per query.

        Full causal attention counts T/2 keys per query (6 T d per layer); a window w
        averages w - w^2/(2T) keys.
        """
        w = mixer_cfg.window
        keys = seq_len / 2 if (w is None or w >= seq_len) else w - w * w / (2 * seq_len)
        return 12.0 * cfg.d_model * keys
