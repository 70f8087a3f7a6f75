"""The TTT inner loop: closed-form gradients, the primal and dual forms, the mini-batch scan.

Sun et al., "Learning to (Learn at Test Time): RNNs with Expressive Hidden States",
arXiv 2407.04620 (Sec. 2.4-2.5 mini-batch TTT and the dual form; Appendix A). Per head, the
hidden state is the inner model's weights; on every mini-batch of b tokens it takes one
gradient step (all gradients at the mini-batch's starting state W_0) on the reconstruction loss

    l(W; t) = 1/2 || LN(g(k_t; W)) - (v_t - k_t) ||^2,

with g(z) = z W_1 + b_1 (TTT-Linear) or GELU_tanh(z W_1 + b_1) W_2 + b_2 (TTT-MLP) and LN a
per-head LayerNorm (gain, bias, eps 1e-6). Token t of the mini-batch reads with

    W_t = W_0 - sum_{s<=t} eta[t, s] k_s^T dl/dZ_s,   eta[t, s] = token_eta_t * lr_s,

and the state after the mini-batch is W_b. The primal form materialises W_t per token; the
dual form gets the same outputs from b x b products (tril(Q K^T)) without it.

Shapes: q, k, v (B, H, L, d); eta (B, H, L, L); a state is a tuple of per-row tensors: TTT-Linear
(W1 (B, H, d, d), b1 (B, H, 1, d)), TTT-MLP (W1 (B, H, d, 4d), b1 (B, H, 1, 4d), W2 (B, H, 4d, d),
b2 (B, H, 1, d)). gamma, beta (H, 1, d). Everything here runs in the dtype it is given (the mixer
passes fp32, or float64 in tests).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

State = tuple[torch.Tensor, ...]
Form = Literal["dual", "primal"]
LN_EPS = 1e-6
_C = math.sqrt(2.0 / math.pi)


def ln_fwd(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, eps: float = LN_EPS) -> torch.Tensor:
    """The per-head LayerNorm over the last dim (biased variance, eps inside the sqrt)."""
    mu = x.mean(-1, keepdim=True)
    var = x.var(-1, keepdim=True, unbiased=False)
    return gamma * (x - mu) / torch.sqrt(var + eps) + beta


def ln_fused_l2_bwd(x: torch.Tensor, target: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                    eps: float = LN_EPS) -> torch.Tensor:
    """d/dx of 1/2 ||LN(x) - target||^2 in closed form: the LayerNorm backward fused with the L2 loss."""
    D = x.shape[-1]
    mu = x.mean(-1, keepdim=True)
    std = torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    x_hat = (x - mu) / std
    g_hat = (gamma * x_hat + beta - target) * gamma
    return (D * g_hat - g_hat.sum(-1, keepdim=True) - x_hat * (g_hat * x_hat).sum(-1, keepdim=True)) / (D * std)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def gelu_tanh_bwd(x: torch.Tensor) -> torch.Tensor:
    """The exact derivative of GELU_tanh (exact constants, so it equals autograd's)."""
    u = _C * (x + 0.044715 * x ** 3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _C * (1 + 3 * 0.044715 * x * x)


def inner_grads(state: State, k: torch.Tensor, v: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer of the inner model: its inputs X_l and the gradients dl/dZ_l at `state`, per token."""
    target = v - k
    if len(state) == 2:
        W1, b1 = state
        return [k], [ln_fused_l2_bwd(k @ W1 + b1, target, gamma, beta)]
    W1, b1, W2, b2 = state
    z1 = k @ W1 + b1
    x2 = gelu_tanh(z1)
    g2 = ln_fused_l2_bwd(x2 @ W2 + b2, target, gamma, beta)
    g1 = (g2 @ W2.transpose(-1, -2)) * gelu_tanh_bwd(z1)
    return [k, x2], [g1, g2]


def dual(state: State, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
         gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One mini-batch in the dual form: (Z-bar of the last inner layer (B, H, L, d), state at t = L).

    Z-bar = X_q W_0 - (eta * tril(X_q X^T)) dZ + b_0 - tril(eta) dZ per layer, with the next
    layer's query input GELU(Z-bar_1) (TTT-MLP); the final state uses eta's last row."""
    xs, gs = inner_grads(state, k, v, gamma, beta)
    eta_l = torch.tril(eta)
    last = eta[..., -1, :, None]                          # (B, H, L, 1): eta[L-1, s]
    new: list[torch.Tensor] = []
    zq = q
    for i, (x, g) in enumerate(zip(xs, gs)):
        W, b = state[2 * i], state[2 * i + 1]
        if i:
            zq = gelu_tanh(zq)
        attn = torch.tril(zq @ x.transpose(-1, -2))
        zq = zq @ W - (eta_l * attn) @ g + b - eta_l @ g
        new += [W - (last * x).transpose(-1, -2) @ g, b - (last * g).sum(-2, keepdim=True)]
    return zq, tuple(new)


def primal(state: State, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eta: torch.Tensor,
           gamma: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, State]:
    """One (possibly partial) mini-batch in the primal form: the per-token weights
    W_t = W_0 - sum_{s<=t} eta[t, s] X_s^T dZ_s are materialised, then Z-bar_t = x_t W_t + b_t."""
    xs, gs = inner_grads(state, k, v, gamma, beta)
    eta_l = torch.tril(eta)
    new: list[torch.Tensor] = []
    zq = q
    for i, (x, g) in enumerate(zip(xs, gs)):
        W, b = state[2 * i], state[2 * i + 1]
        if i:
            zq = gelu_tanh(zq)
        grad_w = torch.einsum("bhsi,bhsj->bhsij", x, g)                     # per-token X_s^T dZ_s
        W_t = W[:, :, None] - torch.einsum("bhts,bhsij->bhtij", eta_l, grad_w)
        b_t = b - eta_l @ g                                                 # (B, H, L, d_out)
        zq = torch.einsum("bhti,bhtij->bhtj", zq, W_t) + b_t
        new += [W_t[:, :, -1], b_t[:, :, -1:]]
    return zq, tuple(new)


FORMS = {"dual": dual, "primal": primal}


def mini_batch_eta(lr: torch.Tensor, token_eta: torch.Tensor) -> torch.Tensor:
    """eta[t, s] = token_eta_t * lr_s: lr (B, H, L), token_eta (L,) -> (B, H, L, L)."""
    return token_eta[:, None] * lr[..., None, :]


def scan(state: State, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lr: torch.Tensor,
         token_eta: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, form: Form = "dual",
         group: int = 0) -> tuple[torch.Tensor, State]:
    """Full mini-batches one after another: q, k, v (B, H, n, b, d), lr (B, H, n, b), token_eta (b,).
    Returns Z-bar (B, H, n, b, d) and the final state. group > 0: each run of `group` mini-batches
    is recomputed in the backward (activation checkpointing), so only the states between groups
    are kept."""
    step = FORMS[form]

    def run(first: int, last: int, *st: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs = []
        for i in range(first, last):
            z, st = step(st, q[:, :, i], k[:, :, i], v[:, :, i], mini_batch_eta(lr[:, :, i], token_eta), gamma, beta)
            outs.append(z)
        return (torch.stack(outs, 2), *st)

    n = q.shape[2]
    size = group if group > 0 else n
    outs = []
    for first in range(0, n, size):
        last = min(first + size, n)
        if group > 0 and torch.is_grad_enabled():
            z, *state = checkpoint(run, first, last, *state, use_reentrant=False)
        else:
            z, *state = run(first, last, *state)
        outs.append(z)
        state = tuple(state)
    return torch.cat(outs, 2), tuple(state)
