"""Muon: momentum orthogonalised by Newton–Schulz for hidden matrices, AdamW for everything else.

Why: Muon (Keller Jordan, 2024; the steepest-descent-under-the-spectral-norm view is Bernstein &
Newhouse, "Old Optimizer, New Norm") replaces each hidden weight matrix's update by the nearest
semi-orthogonal matrix to its momentum, U V^T where momentum = U S V^T, so every direction of the
update moves at the same rate. Embeddings, the LM head and all vectors/scalars are not "hidden
linear maps" in that sense and keep AdamW.

One optimizer holds both kinds so that a run has a single optimizer state to checkpoint. Every
parameter group must say which rule it uses with `use_muon: bool` (`train.optim.param_groups`
sets it from the parameter tags); a group without the flag is an error, never a silent default.

Muon group update, per 2-D parameter W (rows x cols) with gradient G, beta = group["momentum"]:
    B  <- beta * B + (1 - beta) * G              (momentum buffer, an EMA; B starts at 0)
    M  =  (1 - beta) * G + beta * B  if nesterov else B
    O  =  newton_schulz(M, ns_steps)              (~ U V^T, see `newton_schulz`)
    O  *= max(1, rows / cols) ** 0.5              (keeps the update's RMS-to-spectral ratio)
    W  <- W * (1 - lr * weight_decay)             (decoupled weight decay)
    W  <- W - lr * O
AdamW group update (identical to torch.optim.AdamW, amsgrad=False, maximize=False), t = step:
    W  <- W * (1 - lr * weight_decay)
    m  <- beta1 * m + (1 - beta1) * G;   v <- beta2 * v + (1 - beta2) * G^2
    W  <- W - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Written with plain per-tensor ops so it runs on torch >= 2.6 (torch.optim.Muon is newer and
only handles 2-D parameters). Under FSDP2 a Muon parameter is a sharded DTensor; the
Newton–Schulz matmuls then go through DTensor's sharding propagation (correct, not tuned).
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

NS_COEFFICIENTS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)


def newton_schulz(g: Tensor, steps: int = 5, dtype: torch.dtype | None = None, eps: float = 1e-7) -> Tensor:
    """Approximate U V^T of the 2-D matrix `g` (= U S V^T) by the quintic Newton–Schulz iteration.

    X <- X / ||X||_F  (so every singular value is <= 1), then `steps` times
    X <- a X + (b A + c A^2) X  with A = X X^T and (a, b, c) = NS_COEFFICIENTS. That maps each
    singular value s to a s + b s^3 + c s^5; the coefficients maximise the slope at 0 so small
    singular values grow fast, at the price of not converging exactly: the map keeps
    [0.68, 1.14] invariant, so outputs land there rather than at 1, which does not hurt training. X is transposed first when
    rows > cols so that A is the smaller Gram matrix.

    Runs in `dtype`: by default bfloat16 on CUDA (the iteration is robust to it and it is the
    fast path), float64 for float64 input on CPU (tests), float32 otherwise. Returns g's dtype.
    """
    if g.ndim != 2:
        raise ValueError(f"newton_schulz needs a 2-D matrix, got shape {tuple(g.shape)}")
    if dtype is None:
        if g.is_cuda:
            dtype = torch.bfloat16
        else:
            dtype = torch.float64 if g.dtype == torch.float64 else torch.float32
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    transpose = g.size(0) > g.size(1)
    if transpose:
        x = x.mT
    x = x / (x.norm() + eps)
    for _ in range(steps):
        gram = x @ x.mT
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    if transpose:
        x = x.mT
    return x.to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for groups with `use_muon=True` (2-D parameters only), AdamW for the others.

    The constructor's keyword arguments are defaults for keys a group does not set; `lr`,
    `weight_decay` and `eps` usually come per group from `train.optim.param_groups`.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 0.02, momentum: float = 0.95,
                 nesterov: bool = True, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if ns_steps < 0:
            raise ValueError(f"ns_steps must be >= 0, got {ns_steps}")
        if not all(0.0 <= b_ < 1.0 for b_ in betas):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Require the `use_muon` flag, and 2-D parameters in Muon groups."""
        if "use_muon" not in param_group:
            raise ValueError("every Muon parameter group needs 'use_muon': True (Newton–Schulz) "
                             "or False (AdamW); build groups with train.optim.param_groups")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon groups take 2-D parameters only, got shape {tuple(p.shape)} "
                                     f"in group {group.get('name', len(self.param_groups) - 1)!r}")

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One update of every parameter that has a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, beta = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("Muon does not support sparse gradients")
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            buf = state["momentum_buffer"]
            buf.lerp_(g, 1.0 - beta)
            m = g.lerp(buf, beta) if group["nesterov"] else buf
            update = newton_schulz(m, group["ns_steps"])
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            p.add_(update, alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            if g.is_sparse:
                raise RuntimeError("Muon's AdamW groups do not support sparse gradients")
            state = self.state[p]
            if not state:
                # A float32 CPU tensor, like torch.optim.AdamW, so state dicts look alike.
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] += 1
            t = float(state["step"])
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            p.mul_(1.0 - lr * wd)
            exp_avg.lerp_(g, 1.0 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
            bias_correction1 = 1.0 - beta1 ** t
            bias_correction2_sqrt = (1.0 - beta2 ** t) ** 0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
