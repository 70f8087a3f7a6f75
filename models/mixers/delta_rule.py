"""The delta rule in two PyTorch forms: the token recurrence and the chunkwise WY/UT form.

Yang, Wang, Zhang, Shen, Kim, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length", arXiv 2406.06484. Per head, with q_t, k_t in R^dk, v_t in R^dv, a step size
beta_t and the state S in R^{dk x dv} (the paper's state transposed):

    u_t = beta_t (v_t - S_{t-1}^T k_t)                 the pseudo-value
    S_t = S_{t-1} + k_t u_t^T  =  (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T q_t                                    read after the update at t

one SGD step on 1/2 |S^T k_t - v_t|^2 per token. Within a chunk of C tokens (rows K, V, Q;
b = diag(beta)) that starts from the state S, unrolling u_t gives a unit lower triangular system:

    (I + tril(b K K^T, -1)) U' = b V - b K S
    W = L^{-1} b K,  U = L^{-1} b V,  L = I + tril(b K K^T, -1)     (WY / UT transform, Sec. 3)
    U' = U - W S;   O = Q S + tril(Q K^T) U';   S <- S + K^T U'

W and U are computed for all chunks at once (one batched triangular solve), and so are the
outputs once every chunk's incoming state is known; only U' and the state update run chunk
after chunk, so the sequential part is T / C pairs of small matmuls, not T token steps.

Both functions take (B, H, T, d) tensors and beta (B, H, T), an optional initial state
(B, H, dk, dv), and optional `doc_ids` (B, T): where the id changes, a new document starts and
the state restarts from zero (packed documents do not leak into each other; the initial state
belongs to the first document of each row). They return (o in q's dtype, final state).

Numerics: everything runs in promote(dtype, fp32) with autocast off, so under bf16 autocast the
state and the triangular solve stay fp32, and float64 (the reference tests) stays float64.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def document_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: True where a new document starts at t > 0 (the id differs from t - 1)."""
    starts = torch.zeros_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def position_in_document(doc_ids: torch.Tensor) -> torch.Tensor:
    """(B, T): tokens since the start of each token's document (0 at a document's first token)."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    start = torch.where(document_starts(doc_ids), idx, 0).cummax(dim=1).values
    return idx - start


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def delta_rule_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         initial_state: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The token recurrence: the reference for the chunkwise form, and the decoding step."""
    B, H, T, dk = q.shape
    out_dtype, dt = q.dtype, _compute_dtype(q)
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta = (t.to(dt) for t in (q, k, v, beta))
        S = q.new_zeros(B, H, dk, v.shape[-1]) if initial_state is None else initial_state.to(dt)
        keep = None if doc_ids is None else (~document_starts(doc_ids)).to(dt)[:, None, :, None, None]
        # per-token rows (B, H, 1, d); unbind, not indexing: its backward is one stack, where each
        # index's backward would write a full-size zero tensor
        steps = zip(*(t.unsqueeze(3).unbind(2) for t in (q, k, v, beta[..., None])))
        outs = []
        for t, (q_t, k_t, v_t, b_t) in enumerate(steps):
            if keep is not None:
                S = S * keep[:, :, t]                              # a new document: forget the state
            u = b_t * (v_t - k_t @ S)
            S = S + k_t.transpose(-1, -2) @ u
            outs.append(q_t @ S)
        o = torch.cat(outs, dim=2) if outs else v.new_zeros(B, H, 0, v.shape[-1])
    return o.to(out_dtype), S


def delta_rule_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor,
                         chunk_size: int = 64, initial_state: torch.Tensor | None = None,
                         doc_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise WY/UT form (training). Any T: the tail is padded with k = v = q = 0, beta = 0,
    which writes nothing to the state."""
    B, H, T, dk = q.shape
    dv, C = v.shape[-1], chunk_size
    out_dtype, dt = q.dtype, _compute_dtype(q)
    pad = -T % C
    N = (T + pad) // C
    with torch.autocast(q.device.type, enabled=False):
        q, k, v, beta = (t.to(dt) for t in (q, k, v, beta))
        if pad:
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            beta = F.pad(beta, (0, pad))
        q, k, v = (t.reshape(B, H, N, C, -1) for t in (q, k, v))
        beta = beta.reshape(B, H, N, C, 1)

        causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()   # includes the diagonal
        strict = causal.tril(-1)
        cont = last = carry = None
        if doc_ids is not None:
            # segment index per token (padding joins the last segment; it writes nothing)
            seg = document_starts(doc_ids).long().cumsum(1)
            seg = torch.cat([seg, seg[:, -1:].expand(B, pad)], 1).view(B, 1, N, C)
            same = seg[..., :, None] == seg[..., None, :]                     # (B, 1, N, C, C)
            causal, strict = causal & same, strict & same
            prev = torch.cat([seg[:, :, :1, :1], seg[:, :, :-1, -1:]], dim=2)  # last segment of the previous chunk
            cont = (seg == prev).to(dt)[..., None]             # tokens that continue the incoming state's document
            last = (seg == seg[..., -1:]).to(dt)[..., None]    # tokens of the chunk's last document
            carry = cont[:, :, :, -1:]                         # the incoming state survives the chunk

        kb, vb = k * beta, v * beta
        eye = torch.eye(C, dtype=dt, device=q.device)
        L = eye + (kb @ k.transpose(-1, -2)).masked_fill(~strict, 0.0)
        WU = torch.linalg.solve_triangular(L, torch.cat([kb, vb], -1), upper=False, unitriangular=True)
        W, U = WU.split([dk, dv], dim=-1)
        P = (q @ k.transpose(-1, -2)).masked_fill(~causal, 0.0)                # intra-chunk scores

        # the sequential part: each chunk's incoming state and corrected pseudo-values U'
        # (unbind rather than indexing, as in the recurrence)
        S = q.new_zeros(B, H, dk, dv) if initial_state is None else initial_state.to(dt)
        states, us = [], []
        for n, (k_n, W_n, U_n) in enumerate(zip(k.unbind(2), W.unbind(2), U.unbind(2))):
            states.append(S)
            WS = W_n @ S if cont is None else (W_n @ S) * cont[:, :, n]
            u = U_n - WS
            us.append(u)
            kT = k_n.transpose(-1, -2)
            S = S + kT @ u if cont is None else S * carry[:, :, n] + kT @ (u * last[:, :, n])
        # the outputs of all chunks at once: O = Q S_n + tril(Q K^T) U'
        QS = q @ torch.stack(states, dim=2)
        if cont is not None:
            QS = QS * cont
        o = (QS + P @ torch.stack(us, dim=2)).reshape(B, H, N * C, dv)[:, :, :T]
    return o.to(out_dtype), S
