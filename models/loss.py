"""LM-head cross-entropy, computed a chunk of tokens at a time.

The plain loss builds logits = h @ W.T for every token at once, in fp32. At vocab 50k a
micro-batch of 8 x 2048 tokens makes that 16384 x 50257 x 4 bytes = 3.3 GB; the log-softmax
that cross-entropy saves for backward is as big again, and backward adds gradients of the
same size. On a big-vocab model that is often the largest memory peak of the step.

`head_loss` fuses the head matmul with the loss instead. Forward runs the tokens through
in chunks and keeps only a logsumexp per token; backward recomputes each chunk's logits
and turns them straight into that chunk's share of dL/dh and dL/dW. At most one chunk of
fp32 logits is alive at any time, for the price of one more head matmul in backward.
It also keeps the head inside the module that calls it (the decoder), so under FSDP2 a
tied head stays in the root unit with the embedding it shares a weight with.
"""
# The idea (no code) is Liger-Kernel's fused linear cross-entropy, arXiv 2410.10989.
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

IGNORE_INDEX = -100


def head_loss(h: Tensor, weight: Tensor, labels: Tensor, *, z_loss: float = 0.0,
              chunk_tokens: int = 2048) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy and z-loss of the logits h @ weight.T over the target tokens.

    h: (B, T, d) or (N, d) final hidden state; weight: (V, d) head or tied embedding;
    labels: (B, T) or (N,), IGNORE_INDEX where no loss is taken.
    Returns (ce_sum, z_sum) as 0-d tensors in fp32 (fp64 for fp64 inputs), where
    z_sum = z_loss * sum of logsumexp(logits)^2 (zero when z_loss == 0). Sums, not means,
    so that the caller can divide by the target tokens of the whole step.
    chunk_tokens <= 0, or no more tokens than that, takes the plain (unchunked) path.
    """
    if h.shape[:-1] != labels.shape:
        raise ValueError(f"h {tuple(h.shape)} and labels {tuple(labels.shape)} disagree on the tokens")
    h = h.reshape(-1, h.shape[-1])
    labels = labels.reshape(-1).long()
    if chunk_tokens <= 0 or h.shape[0] <= chunk_tokens:
        return _plain_head_loss(h, weight, labels, z_loss)
    return _ChunkedHeadLoss.apply(h, weight, labels, float(z_loss), int(chunk_tokens))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss arithmetic runs in fp32, or fp64 when the matmul itself is fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _plain_head_loss(h: Tensor, weight: Tensor, labels: Tensor, z_loss: float) -> tuple[Tensor, Tensor]:
    """All logits at once: the reference, and the path for inputs that fit in one chunk."""
    logits = h @ weight.t()
    logits = logits.to(_acc_dtype(logits.dtype))
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss == 0:
        return ce, torch.zeros((), dtype=ce.dtype, device=ce.device)
    lse = torch.logsumexp(logits, dim=-1)
    z = torch.where(labels != IGNORE_INDEX, lse * lse, 0.0).sum() * z_loss
    return ce, z


def _matmul_dtype(h: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype that `h @ weight.T` runs in here: autocast's when autocast is on (it leaves
    fp64 alone), else the inputs' own. Recorded in forward and reused in backward, so the
    recomputed logits match whatever autocast state backward happens to run under."""
    device = h.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (h.dtype, weight.dtype):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(h.dtype, weight.dtype)


class _ChunkedHeadLoss(torch.autograd.Function):
    """(h, weight, labels) -> (ce_sum, z_sum), holding at most one chunk of logits at a time.

    Saved for backward: the inputs and one logsumexp per token, nothing of size N x V.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, h: Tensor, weight: Tensor, labels: Tensor, z_loss: float,
                chunk_tokens: int) -> tuple[Tensor, Tensor]:
        mm_dtype = _matmul_dtype(h, weight)
        acc = _acc_dtype(mm_dtype)
        w = weight.to(mm_dtype)                      # cast once, not once per chunk
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, 0)
        n = h.shape[0]
        lse = torch.empty(n, dtype=acc, device=h.device)
        target_logit = torch.empty(n, dtype=acc, device=h.device)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            logits = (h[s:e].to(mm_dtype) @ w.t()).to(acc)
            lse[s:e] = torch.logsumexp(logits, dim=-1)
            target_logit[s:e] = logits.gather(1, target[s:e, None]).squeeze(1)
            del logits                               # freed before the next chunk's matmul
        ce = torch.where(valid, lse - target_logit, 0.0).sum()
        if z_loss == 0:
            z = torch.zeros((), dtype=acc, device=h.device)
        else:
            z = torch.where(valid, lse * lse, 0.0).sum() * z_loss
        ctx.save_for_backward(h, weight, labels, lse)
        ctx.z_loss, ctx.chunk_tokens, ctx.mm_dtype = z_loss, chunk_tokens, mm_dtype
        return ce, z

    @staticmethod
    @once_differentiable
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_ce: Tensor, grad_z: Tensor):
        h, weight, labels, lse = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        mm_dtype, chunk = ctx.mm_dtype, ctx.chunk_tokens
        w = weight.to(mm_dtype)
        valid = labels != IGNORE_INDEX
        target = torch.where(valid, labels, 0)
        # dL/dlogits of one token = softmax * (g_ce + 2 z g_z lse) - g_ce * onehot(target);
        # zero for ignored tokens.
        p_scale = torch.where(valid, grad_ce + 2 * ctx.z_loss * grad_z * lse, 0.0)
        onehot_scale = torch.where(valid, grad_ce.to(lse.dtype), 0.0)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_w else None
        for s in range(0, h.shape[0], chunk):
            e = min(s + chunk, h.shape[0])
            hc = h[s:e].to(mm_dtype)
            g = (hc @ w.t()).to(lse.dtype)           # the chunk's logits again ...
            g.sub_(lse[s:e, None]).exp_()            # ... -> softmax, in place
            g.mul_(p_scale[s:e, None])
            g.scatter_add_(1, target[s:e, None], -onehot_scale[s:e, None])
            g = g.to(mm_dtype)
            if need_h:
                grad_h[s:e] = g @ w
            if need_w:
                if grad_w.dtype == g.dtype:
                    grad_w.addmm_(g.t(), hc)
                else:                                # bf16 products, summed in fp32
                    grad_w += g.t() @ hc
            del g                                    # likewise
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None
