"""Causal softmax attention through F.scaled_dot_product_attention.

RoPE, grouped-query attention (n_kv_heads < n_heads), optional QK-norm, optional sliding window,
optional intra-document masking, and a KV cache for incremental decoding. LN-free stabilizers:
a learnable per-head temperature (`temperature`) and Q/K biases (`qk_bias`); the attention
entropy probe and regulariser (models/entropy.py) on a side path that leaves SDPA's output as is.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.context import Aux, LossTerm, MixerContext
from models.entropy import attention_probs, entropy_penalty, max_entropy, row_entropy
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
    temperature: bool = False   # learnable per-head temperature tau_h (log-parameterised, init 1): q / tau_h
    qk_bias: bool = False       # biases on the Q and K projections (as the LN-free reference)
    v_bias: bool = False        # a bias on the V projection (fold-norms puts a LayerNorm v-path bias there)

    def validate(self, path: str) -> None:
        if self.window is not None:
            require(self.window >= 1, f"{path}.window", f"must be >= 1 or null, got {self.window}")


class KVCache:
    """Keys and values seen so far, (B, H_kv, S, Dh) each.

    With a sliding window it is a rolling cache: after each step only the last `window` entries
    are kept (a query sees itself and the window-1 keys before it), so decoding memory is bounded
    by the window, not by the sequence. The keys kept are contiguous and end at the newest token,
    so the relative window mask of `attention_mask` still applies."""

    def __init__(self, window: int | None = None) -> None:
        self.window = window
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values this step attends to (the cached ones, then the new)."""
        k = k if self.k is None else torch.cat([self.k, k], dim=2)
        v = v if self.v is None else torch.cat([self.v, v], dim=2)
        if self.window is not None and k.shape[2] > self.window:       # a copy: no view of the full step
            self.k, self.v = k[:, :, -self.window:].clone(), v[:, :, -self.window:].clone()
        else:
            self.k, self.v = k, v
        return k, v


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


def pad_attention_mask(mask: torch.Tensor, pad_mask: torch.Tensor) -> torch.Tensor:
    """`mask` (q_len, k_len) or (B, 1, q_len, k_len) restricted to real keys: (B, 1, q_len, k_len).

    pad_mask: (B, k_len), True at real tokens. A padding query keeps its causal keys (all padding
    under left padding), so no row is empty: SDPA would return NaN there, and NaN times a zero
    weight still poisons the real rows of the next layer."""
    q_len = mask.shape[-2]
    keep = pad_mask[:, None, None, :] | ~pad_mask[:, None, -q_len:, None]
    return mask & keep


def _flex_mask_mod(window: int | None, doc_ids: torch.Tensor | None):
    """flex_attention's mask_mod: causal, within the window, within the document."""
    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx
        if window is not None:
            keep = keep & (q_idx - kv_idx < window)
        if doc_ids is not None:
            keep = keep & (doc_ids[b, q_idx] == doc_ids[b, kv_idx])
        return keep
    return mask_mod


# The last block mask per (T, window, device, documents): every layer of one forward shares it
# (with doc_ids, while they are the same tensor), so a mask is built once per batch, not per layer.
_BLOCK_MASKS: dict[tuple, tuple[torch.Tensor | None, Any]] = {}
_COMPILED_FLEX: list = []


def flex_block_mask(T: int, window: int | None, doc_ids: torch.Tensor | None, device: torch.device) -> Any:
    """create_block_mask for the sliding window / documents: compiled on CUDA (so its (T, T)
    evaluation never materialises), eager elsewhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    key = (T, window, str(device), doc_ids is not None)
    hit = _BLOCK_MASKS.get(key)
    if hit is not None and hit[0] is doc_ids:
        return hit[1]
    B = doc_ids.shape[0] if doc_ids is not None else None
    mask = create_block_mask(_flex_mask_mod(window, doc_ids), B, None, T, T, device=device,
                             _compile=device.type == "cuda")
    _BLOCK_MASKS[key] = (doc_ids, mask)
    return mask


def flex(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any, scale: float | None,
         gqa: bool) -> torch.Tensor:
    """flex_attention (q, k, v: (B, H, T, Dh)): torch.compile'd on CUDA (its fused kernel; eager
    flex is a reference that materialises the scores), eager on CPU (the fp64 tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.is_cuda:
        if not _COMPILED_FLEX:
            _COMPILED_FLEX.append(torch.compile(flex_attention, dynamic=False))
        fn = _COMPILED_FLEX[0]
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope with shared (T, Dh) tables, or per-row (B, T, Dh) ones (a pad_mask's positions)."""
    if cos.dim() == 2:
        return apply_rope(x, cos, sin)
    B, T = x.shape[:2]
    rows = apply_rope(x.reshape(1, B * T, *x.shape[2:]), cos.reshape(B * T, -1), sin.reshape(B * T, -1))
    return rows.view_as(x)


@MIXERS.register("attention", config=AttentionConfig)
class Attention(nn.Module):
    param_tags = {"log_tau": "scalar", "ereg_theta": "scalar"}
    takes_pad_mask = True          # honours MixerContext.pad_mask (left-padded batches)
    takes_value_input = True       # forward(value_input=...): v from its own input (LayerNorm removal's v path)
    # the projections that read the input norm's output, by path (models/norm_fold.py)
    norm_inputs = {"all": ("wq", "wk", "wv"), "qk": ("wq", "wk"), "v": ("wv",)}
    norm_input_bias_keys = {"wq": "qk_bias", "wk": "qk_bias", "wv": "v_bias"}   # the config key giving each a bias

    def __init__(self, cfg: ModelConfig, mixer_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.window = mixer_cfg.window
        self.doc_mask = cfg.doc_mask
        # flex_attention for the window / documents: None = on CUDA (the dense mask stays the CPU
        # default); True forces eager flex on CPU (tests compare it with the dense path in fp64)
        self.use_flex: bool | None = None
        d, dh = cfg.d_model, cfg.head_dim
        self.wq = tag_linear(nn.Linear(d, self.n_heads * dh, bias=mixer_cfg.qk_bias))
        self.wk = tag_linear(nn.Linear(d, self.n_kv_heads * dh, bias=mixer_cfg.qk_bias))
        self.wv = tag_linear(nn.Linear(d, self.n_kv_heads * dh, bias=mixer_cfg.v_bias))
        self.wo = tag_linear(nn.Linear(self.n_heads * dh, d, bias=False))
        self.wo.is_residual_out = True
        self.scale = build_parameterization(cfg).attention_scale(dh)   # None: 1/sqrt(dh)
        self.q_norm = RMSNorm(dh, cfg.norm.eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(dh, cfg.norm.eps) if cfg.qk_norm else None
        # log tau_h, folded into q (SDPA's scale is a Python float and cannot carry a parameter)
        self.log_tau = nn.Parameter(torch.zeros(self.n_heads)) if mixer_cfg.temperature else None
        ereg = cfg.entropy_reg
        self.ereg_weight, self.ereg_margin = ereg.weight, ereg.margin
        if ereg.weight > 0:           # its share of the mean over layers: 1 / (attention layers)
            letters = cfg.layers.letters(cfg.n_layers)
            self.ereg_layers = sum(cfg.layers.mixers[x].kind == "attention" for x in letters)
            theta = torch.zeros(self.n_heads)                      # sigmoid(0) = 0.5
            if ereg.learn_threshold:
                self.ereg_theta = nn.Parameter(theta)
            else:
                self.register_buffer("ereg_theta", theta, persistent=False)
        else:
            self.ereg_theta = None

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for p in (self.log_tau, self.ereg_theta):
                if isinstance(p, nn.Parameter):
                    p.zero_()

    def reset_buffers(self) -> None:
        """The fixed thresholds (learn_threshold: false) are a non-persistent buffer: set again after
        a meta-device build (FSDP2), which leaves buffers uninitialised."""
        if self.ereg_theta is not None and not isinstance(self.ereg_theta, nn.Parameter):
            with torch.no_grad():
                self.ereg_theta.zero_()

    def new_cache(self) -> KVCache:
        return KVCache(self.window)          # rolling (window entries) for a sliding window

    def _flex_on(self, device: torch.device) -> bool:
        masked = self.window is not None or self.doc_mask
        return masked and (self.use_flex if self.use_flex is not None else device.type == "cuda")

    @property
    def kernel(self) -> str:
        """sdpa_causal: SDPA's own causal path; flex: flex_attention with a block mask (window,
        doc_mask on CUDA); sdpa_mask: SDPA with a dense (T, T) mask (window, doc_mask elsewhere).
        Decoding and left-padded batches take the dense mask whatever this says."""
        if self._flex_on(self.wq.weight.device):
            return "flex"
        return "sdpa_mask" if (self.window is not None or self.doc_mask) else "sdpa_causal"

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache: KVCache | None = None,
                value_input: torch.Tensor | None = None) -> Any:
        """value_input: the values' own input (the v-path norm of LayerNorm removal); None: x."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x if value_input is None else value_input).view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rope(q, ctx.cos, ctx.sin), _rope(k, ctx.cos, ctx.sin)
        if self.log_tau is not None:
            q = q * torch.exp(-self.log_tau).to(q.dtype)[:, None]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)
        S = k.shape[2]
        doc_ids = ctx.doc_ids if (self.doc_mask and cache is None) else None
        mask = None
        side_path = (self.ereg_theta is not None and self.training and cache is None) or ctx.want_stats
        if S == T and self.window is None and doc_ids is None and ctx.pad_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        elif S == T and ctx.pad_mask is None and not side_path and self._flex_on(x.device):
            block_mask = flex_block_mask(T, self.window, doc_ids, x.device)
            y = flex(q, k, v, block_mask, self.scale, self.n_kv_heads != self.n_heads)
        else:
            mask = attention_mask(T, S, self.window, x.device, doc_ids)
            if ctx.pad_mask is not None:        # a rolling cache holds the last S keys only
                mask = pad_attention_mask(mask, ctx.pad_mask[:, -S:])
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale,
                                               enable_gqa=self.n_kv_heads != self.n_heads)
        out = self.wo(y.transpose(1, 2).reshape(B, T, -1))
        regularise = self.ereg_theta is not None and self.training and cache is None
        if not (regularise or ctx.want_stats):
            return out
        # the side path: the probabilities SDPA does not materialise, from the same q and k
        entropy = row_entropy(attention_probs(q, k, self.scale, mask))          # (B, H, T)
        aux = Aux({}, {})
        if ctx.want_stats:
            aux.stats["attn_entropy"] = entropy.detach().mean(dim=(0, 2))        # per head
            aux.stats["attn_entropy_max"] = max_entropy(mask, T, S, x.device).to(entropy.dtype)
        if regularise:
            n_keys = S if self.window is None else min(S, self.window)     # E_max: a full row's keys
            pen = entropy_penalty(entropy, torch.sigmoid(self.ereg_theta), self.ereg_margin, n_keys)
            aux.losses["entropy_reg"] = LossTerm(self.ereg_weight * pen / self.ereg_layers, "mean")
        return out, aux

    @staticmethod
    def flops_per_token(cfg: ModelConfig, mixer_cfg: AttentionConfig, seq_len: int) -> float:
        """Score and value matmuls (fwd+bwd), beyond the projections: 12 d x mean keys per query.

        Full causal attention counts T/2 keys per query (6 T d per layer); a window w
        averages w - w^2/(2T) keys.
        """
        w = mixer_cfg.window
        keys = seq_len / 2 if (w is None or w >= seq_len) else w - w * w / (2 * seq_len)
        return 12.0 * cfg.d_model * keys
