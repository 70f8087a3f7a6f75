"""DeltaNet: linear attention whose state is updated by the delta rule.

Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length" (NeurIPS 2024), arXiv 2406.06484; the layer follows the paper's released code
(flash-linear-attention, `fla/layers/delta_net.py`). Per layer, with H heads of dim dh:

    q, k, v = x W_q, x W_k, x W_v                       (d -> H dh each, no bias)
    q, k, v = SiLU(short_conv(q, k, v))                 causal depthwise conv, kernel conv_size
    q, k    = L2-normalised per head; q scaled by dh^-1/2
    beta    = sigmoid(x W_b) per head and token          (x 2 with allow_neg_eigval: "Unlocking
                                                         State-Tracking in Linear RNNs Through
                                                         Negative Eigenvalues", arXiv 2411.12537)
    o       = delta rule (models/mixers/delta_rule.py)
    y       = W_o RMSNorm_head(o)                        (or RMSNorm_head(o) * SiLU(x W_g), use_gate)

Training runs the chunkwise WY/UT form (`torch_chunk`), or fla's Triton chunk kernel
(`fla_chunk`) when `backend` picks it. Decoding always takes the PyTorch path: the cache keeps
the short convolution's last inputs and the recurrent state; a prompt is prefilled chunkwise
from the cached state, then each token goes through the recurrence (`torch_recurrent`).
With `model.doc_mask` both the state and the convolution window restart at every document
boundary (outside decoding, as for attention). The conv keeps its own init (nn.Conv1d's) and
the output norm its gain of one.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.context import MixerContext
from models.mixers.delta_rule import (delta_rule_chunkwise, delta_rule_recurrent, document_starts,
                                      position_in_document)
from models.norms import RMSNorm
from models.registry import MIXERS, ConfigError
from models.schema import require
from models.tags import TagSpec, register_tag, tag_linear

# A depthwise causal conv's weight: one K-tap filter per channel, whose fan-in (K) does not grow
# with width, so it follows the per-channel (bias-like) rules; nn.Conv1d's own init.
SHORT_CONV = register_tag(TagSpec("short_conv", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                  init="module", role="hidden_bias"))


@functools.cache
def fla_chunk_delta_rule() -> Callable | None:
    """fla's chunk kernel, or None. Without Triton `import fla` succeeds and exports nothing, so
    the function itself is imported."""
    try:
        from fla.ops.delta_rule import chunk_delta_rule
    except Exception:            # ImportError, or Triton failing to initialise
        return None
    return chunk_delta_rule


@dataclass
class DeltaNetConfig:
    kind: str = "deltanet"          # the mixer kind (a registered MIXERS name)
    n_heads: int | None = None      # DeltaNet heads; null: model.n_heads
    head_dim: int | None = None     # key and value dim per head; null: d_model / n_heads
    chunk_size: Literal[16, 32, 64] = 64   # tokens per chunk of the chunkwise training form (fla's sizes)
    conv_size: int = 4              # kernel of the causal depthwise conv on q, k, v (0: no conv)
    use_gate: bool = False          # output RMSNorm(o) * SiLU(x W_g) instead of RMSNorm(o)
    allow_neg_eigval: bool = False  # beta in (0, 2) instead of (0, 1): state eigenvalues in (-1, 1)
    backend: Literal["auto", "torch", "fla"] = "auto"   # auto: fla's chunk kernel on CUDA if installed, else torch

    def validate(self, path: str) -> None:
        for key in ("n_heads", "head_dim"):
            value = getattr(self, key)
            require(value is None or value >= 1, f"{path}.{key}", f"must be >= 1 or null, got {value}")
        require(self.conv_size >= 0, f"{path}.conv_size", f"must be >= 0 (0: no conv), got {self.conv_size}")
        if self.backend == "fla":
            require(torch.cuda.is_available(), f"{path}.backend", "fla's kernels need CUDA, and none is "
                    "available; use backend: auto or torch")
            require(fla_chunk_delta_rule() is not None, f"{path}.backend",
                    "needs the flash-linear-attention package with Triton (`from fla.ops.delta_rule import "
                    "chunk_delta_rule` failed); install it or use backend: auto or torch")


def resolve_heads(cfg: ModelConfig, mixer_cfg: DeltaNetConfig, key: str) -> tuple[int, int]:
    """(heads, head dim); null means the model's heads and d_model / heads, which must divide."""
    h = mixer_cfg.n_heads or cfg.n_heads
    if mixer_cfg.head_dim is not None:
        return h, mixer_cfg.head_dim
    if cfg.d_model % h:
        raise ConfigError(f"{key}.n_heads", f"n_heads={h} does not divide d_model={cfg.d_model}; "
                          f"choose a divisor or set {key}.head_dim")
    return h, cfg.d_model // h


def short_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor | None = None,
               doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal depthwise conv y_t = sum_j w[K-1-j] x_{t-j}, j < K (nn.Conv1d's weight (C, 1, K)).

    x (B, T, C); state: the previous call's last K-1 inputs (decoding; zeros when None). With
    doc_ids no tap reaches into the previous document (a masked sum of shifted copies, as
    F.conv1d cannot mask per output); not with a state, which the mask would drop. Returns (y,
    the last K-1 inputs)."""
    if state is not None and doc_ids is not None:
        raise ValueError("short_conv: a decode state and doc_ids do not combine (decoding runs without doc_mask)")
    B, T, C = x.shape
    K = weight.shape[-1]
    past = x.new_zeros(B, K - 1, C) if state is None else state.to(x.dtype)
    xp = torch.cat([past, x], dim=1)                                    # (B, K - 1 + T, C)
    if doc_ids is None:
        # as a (1, K) conv2d on (B, C, 1, T): the transposed view is channels-last there, which
        # oneDNN takes as is; conv1d reorders it (measured on CPU: 2x to 4x slower, fwd + bwd)
        y = F.conv2d(xp.transpose(1, 2).unsqueeze(2), weight.unsqueeze(2), groups=C)
        return y.squeeze(2).transpose(1, 2), xp[:, T:]
    pos = position_in_document(doc_ids)[..., None]       # the same sum, tap by tap, each tap masked
    y = xp[:, K - 1:] * weight[:, 0, K - 1]
    for i in range(K - 1):
        y = y + xp[:, i:i + T] * weight[:, 0, i] * (pos >= K - 1 - i)  # x_{t-lag} only from t's document
    return y, xp[:, T:]


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(sum x^2 + eps) over the head dim (fla's l2norm), in fp32 or wider."""
    xf = x.to(torch.promote_types(x.dtype, torch.float32))
    return xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) + eps)


def cu_seqlens(doc_ids: torch.Tensor) -> torch.Tensor:
    """Document start offsets in the flattened (1, B*T) sequence, then B*T (fla's varlen input)."""
    starts = document_starts(doc_ids)
    starts[:, 0] = True
    idx = starts.flatten().nonzero().flatten()
    return torch.cat([idx, idx.new_tensor([doc_ids.numel()])])


class DeltaNetCache:
    """Decoding state: the short conv's last K-1 inputs (B, K-1, C) and the delta-rule state
    (B, H, dh, dh), kept in fp32 (or wider)."""

    def __init__(self) -> None:
        self.conv: torch.Tensor | None = None
        self.state: torch.Tensor | None = None


@MIXERS.register("deltanet", config=DeltaNetConfig)
class DeltaNet(nn.Module):
    param_tags: dict[str, str] = {}
    norm_inputs = {"all": ("wq", "wk", "wv", "wb", "wg")}   # what reads the input norm (models/norm_fold.py)
    bench_forms = ("chunk", "recurrent")     # `ablate bench --mixers` times both PyTorch forms

    def __init__(self, cfg: ModelConfig, mixer_cfg: DeltaNetConfig, layer_idx: int):
        super().__init__()
        self.key = f"model.layers.mixers.{cfg.layers.letters(cfg.n_layers)[layer_idx]}"
        self.n_heads, self.head_dim = resolve_heads(cfg, mixer_cfg, self.key)
        self.chunk_size, self.backend = mixer_cfg.chunk_size, mixer_cfg.backend
        self.beta_scale = 2.0 if mixer_cfg.allow_neg_eigval else 1.0
        self.doc_mask = cfg.doc_mask
        self.form: Literal["chunk", "recurrent"] = "chunk"     # the PyTorch form training takes
        d, inner = cfg.d_model, self.n_heads * self.head_dim
        self.wq = tag_linear(nn.Linear(d, inner, bias=False))
        self.wk = tag_linear(nn.Linear(d, inner, bias=False))
        self.wv = tag_linear(nn.Linear(d, inner, bias=False))
        self.wb = tag_linear(nn.Linear(d, self.n_heads, bias=False))
        self.conv = None
        if mixer_cfg.conv_size > 0:       # one depthwise conv over q|k|v: per channel, so the same as three
            self.conv = nn.Conv1d(3 * inner, 3 * inner, mixer_cfg.conv_size, groups=3 * inner, bias=False)
            self.conv.param_tags = {"weight": SHORT_CONV.name}
        self.wg = tag_linear(nn.Linear(d, inner, bias=False)) if mixer_cfg.use_gate else None
        self.o_norm = RMSNorm(self.head_dim, eps=1e-5)        # per head, fp32 statistics (fla's eps)
        self.wo = tag_linear(nn.Linear(inner, d, bias=False))
        self.wo.is_residual_out = True

    def new_cache(self) -> DeltaNetCache:
        return DeltaNetCache()

    @property
    def kernel(self) -> str:
        """torch_chunk (chunkwise WY form), fla_chunk (fla's Triton kernel) or torch_recurrent."""
        if self.form == "recurrent":
            return "torch_recurrent"
        if self.wq.weight.device.type != "cuda" or self.backend == "torch":
            return "torch_chunk"
        return "fla_chunk" if self.backend == "fla" or fla_chunk_delta_rule() is not None else "torch_chunk"

    def _use_fla(self, x: torch.Tensor) -> bool:
        """fla's kernel for the training forward: `fla` always (on CUDA), `auto` for CUDA inputs
        when fla is importable, except float64 (reference checks), which fla has no kernel for."""
        if self.form != "chunk" or self.backend == "torch":
            return False
        if self.backend == "fla":
            if not x.is_cuda:
                raise ConfigError(f"{self.key}.backend", f"fla's kernel runs on CUDA; this model runs on "
                                  f"{x.device.type} (use backend: auto or torch)")
            return True
        return x.is_cuda and x.dtype != torch.float64 and fla_chunk_delta_rule() is not None

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache: DeltaNetCache | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, dh = self.n_heads, self.head_dim
        doc_ids = ctx.doc_ids if (self.doc_mask and cache is None) else None
        qkv = torch.cat([self.wq(x), self.wk(x), self.wv(x)], dim=-1)
        if self.conv is not None:
            qkv, conv_state = short_conv(qkv, self.conv.weight, cache.conv if cache is not None else None, doc_ids)
            if cache is not None:
                cache.conv = conv_state
        q, k, v = F.silu(qkv).view(B, T, 3, H, dh).unbind(2)             # (B, T, H, dh) each
        q, k = _l2norm(q) * dh ** -0.5, _l2norm(k)
        beta = torch.sigmoid(self.wb(x).to(q.dtype)) * self.beta_scale   # (B, T, H), fp32 or wider
        if cache is None and self._use_fla(x):
            o = self._fla(q, k, v, beta, doc_ids)
        else:
            o = self._torch(q, k, v, beta, doc_ids, cache)
        o = self.o_norm(o)
        if self.wg is not None:
            o = o * F.silu(self.wg(x).view(B, T, H, dh))
        return self.wo(o.reshape(B, T, H * dh))

    def _torch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
               doc_ids: torch.Tensor | None, cache: DeltaNetCache | None) -> torch.Tensor:
        """The PyTorch forms on (B, H, T, dh); decoding: chunkwise prefill, one-token recurrence."""
        q, k, v, beta = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), beta.transpose(1, 2)
        initial = cache.state if cache is not None else None
        if self.form == "recurrent" or (cache is not None and q.shape[2] == 1):
            o, state = delta_rule_recurrent(q, k, v, beta, initial, doc_ids)
        else:
            o, state = delta_rule_chunkwise(q, k, v, beta, self.chunk_size, initial, doc_ids)
        if cache is not None:
            cache.state = state
        return o.transpose(1, 2)

    def bench_core(self, B: int, T: int, device: torch.device) -> Callable[[], None]:
        """Forward + backward of the current form's core alone: the call the layer's forward makes
        after its projections (fla's kernel where the layer would take it), on random inputs in
        the layer's layout ((B, T, H, dh), q and k L2-normalised, beta in (0, beta_scale)) and
        dtype (bf16 on CUDA, as under autocast). `ablate bench --mixers` times it beside the
        whole layer, whose rows also pay for the projections, conv and norm both forms share."""
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        g = torch.Generator().manual_seed(0)
        shape = (B, T, self.n_heads, self.head_dim)
        q = _l2norm(torch.randn(shape, generator=g)) * self.head_dim ** -0.5
        k = _l2norm(torch.randn(shape, generator=g))
        v, beta = torch.randn(shape, generator=g), torch.rand(shape[:3], generator=g) * self.beta_scale
        leaves = [t.to(device, dtype).requires_grad_() for t in (q, k, v, beta)]
        grad = torch.randn(shape, generator=g).to(device, dtype)
        use_fla = self._use_fla(leaves[0])

        def fwd_bwd() -> None:
            q, k, v, beta = leaves
            o = self._fla(q, k, v, beta, None) if use_fla else self._torch(q, k, v, beta, None, None)
            o.backward(grad)
            for t in leaves:
                t.grad = None
        return fwd_bwd

    def _fla(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
             doc_ids: torch.Tensor | None) -> torch.Tensor:
        """fla's chunk kernel on (B, T, H, dh); it takes no fp32, so fp32 (or wider) inputs go in
        as bf16 (its solve and state are fp32 inside). Packed documents: its varlen interface."""
        dt = torch.bfloat16 if q.dtype in (torch.float32, torch.float64) else q.dtype
        q, k, v, beta = (t.to(dt) for t in (q, k, v, beta))
        chunk = fla_chunk_delta_rule()
        if doc_ids is None:
            o, _ = chunk(q, k, v, beta, scale=1.0, chunk_size=self.chunk_size)
            return o
        B, T = doc_ids.shape
        flat = [t.flatten(0, 1).unsqueeze(0) for t in (q, k, v, beta)]
        o, _ = chunk(*flat, scale=1.0, cu_seqlens=cu_seqlens(doc_ids), chunk_size=self.chunk_size)
        return o.view(B, T, *o.shape[2:])

    @staticmethod
    def flops_per_token(cfg: ModelConfig, mixer_cfg: DeltaNetConfig, seq_len: int) -> float:
        """The chunkwise form's FLOPs beyond the projections (fwd + bwd = 3 x fwd), for H heads
        of dim d and chunk C, 2 FLOPs a multiply-add, triangular products at half (as attention's
        causal half). Per head and token, forward:

            3 C d   K K^T (strictly lower), W = L^-1 (b K) (the triangular solve), tril(Q K^T)
            2 C d   U = L^-1 (b V), tril(Q K^T) U'
            6 d^2   W S, Q S, K^T U'

        plus the short conv, 2 x conv_size FLOPs per channel (3 H d channels). Total per token:
        3 H (5 C d + 6 d^2) + 18 conv_size H d; it does not grow with seq_len, unlike
        attention's 6 T d.
        """
        h, d = resolve_heads(cfg, mixer_cfg, "model.layers.mixers")
        c = mixer_cfg.chunk_size
        return 3.0 * h * (5 * c * d + 6 * d * d) + 18.0 * mixer_cfg.conv_size * h * d
