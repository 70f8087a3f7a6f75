"""Attention entropy: the probe (per layer and head, against the causal maximum log(t+1)) and the
entropy regulariser of "Entropy-Guided Attention for Private LLMs" (Jha & Reagen, arXiv
2501.03489), for LN-free models, where early heads drift to maximum entropy ("entropic
overload") and deep heads collapse to one-hot rows.

Both need the attention probabilities, which the fused SDPA kernel never materialises, so they
are computed on an explicit side path from the same q and k (the SDPA output is untouched), and
only when asked: `want_stats` (the probe) or a training forward with `model.entropy_reg.weight`.

Regulariser, per layer l, head h and query row i with E_max = log(T) (T keys, as the reference
code; a sliding-window layer's rows see at most `window` keys: log(min(T, window))): delta = E -
theta_h E_max, pen = delta^2 [|delta| > margin E_max]; the loss is `weight` x the mean of pen
over (layer, head, batch, position). The reference sums over batch and positions, so
weight_ours = weight_paper x B x T gives its numbers.
"""
from __future__ import annotations

import math

import torch


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float | None, mask: torch.Tensor | None) -> torch.Tensor:
    """softmax(q k^T * scale) in fp32 (fp64 stays fp64): q (B, H, T, D), k (B, H or H_kv, S, D),
    `mask` boolean (True = may attend), broadcastable to (B, H, T, S); None: causal."""
    dt = torch.promote_types(q.dtype, torch.float32)
    if k.shape[1] != q.shape[1]:                          # grouped-query attention: share each kv head
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if mask is None:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)


def row_entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum_j p_j log p_j over the last dimension (0 log 0 = 0)."""
    return -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(-1)


def causal_max_entropy(T: int, S: int, device: torch.device) -> torch.Tensor:
    """log(number of keys each of the T queries sees) for a causal row over S keys: log(t + 1)."""
    return torch.log(torch.arange(S - T + 1, S + 1, device=device, dtype=torch.float64))


def max_entropy(mask: torch.Tensor | None, T: int, S: int, device: torch.device) -> torch.Tensor:
    """The mean over rows of log(keys the row may attend to): the entropy of uniform rows. `mask`
    as for attention_probs (a window or document mask counts its own keys); None: causal."""
    if mask is None:
        return causal_max_entropy(T, S, device).mean()
    keys = mask.expand(*mask.shape[:-2], T, S).sum(-1).clamp_min(1)
    return torch.log(keys.to(torch.float64)).mean()


def entropy_penalty(entropy: torch.Tensor, theta: torch.Tensor, margin: float, n_keys: int) -> torch.Tensor:
    """Mean over (batch, head, position) of delta^2 where |delta| > margin E_max, delta = E -
    theta_h E_max, E_max = log(n_keys). entropy (B, H, T); theta (H,) in (0, 1)."""
    e_max = math.log(n_keys)
    delta = entropy - theta.to(entropy.dtype)[None, :, None] * e_max
    outside = delta.abs() > margin * e_max
    return torch.where(outside, delta.square(), torch.zeros_like(delta)).mean()
