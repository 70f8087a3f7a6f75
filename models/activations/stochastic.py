"""Stochastic activations, StochA ("Stochastic activations", Lomeli, Douze, ..., Jegou, arXiv 2509.22358).

    y = m relu(u) + (1 - m) silu(u),   m ~ Bernoulli(1 - p)        (p: the probability of SiLU)

For u < 0 ReLU has no gradient and SiLU has one, so the mix lets gradient through negative
pre-activations while training; the net is then fine-tuned and run with ReLU (sparse FFN).
Inside a GLU (`kind: glu, activation: stochastic`) it is the gate's activation.

Masks come from a counter-based generator, not a stateful RNG: every draw is a pure function
of (seed, layer, global sample index, position[, hidden unit]) hashed to 32 bits, and SiLU is
picked where the hash is below p * 2^32. Hence:
- reproducible, with no RNG state in checkpoints;
- independent of the number of ranks and of the micro-batch split: a sample's mask depends on
  its global index (the loader's `indices`, passed as `Decoder.forward(sample_index=...)`), not
  on which rank or micro-batch holds it;
- the same on every device (integer arithmetic), and recomputed identically by activation
  checkpointing or a KV-cache decode (positions are absolute);
- drawn once in forward and saved for backward (the autograd Function keeps the boolean mask).
Without `sample_index` (evaluation, generation) every row acts as sample 0, so a sequence's masks
depend on its positions only, never on how requests were batched.

Granularity (`model.ffn.stochastic.granularity`): `element` (default: one draw per hidden unit,
the only one that gives a per-unit gradient through u < 0), `token` (one draw per token, shared
by the F hidden units), `call` (one draw per layer per training step, shared by all tokens,
micro-batches and ranks; keyed by the step that train/callbacks/activation_schedule.py sets, 0 otherwise).

Eval (`eval_mode`): relu (the sparse deployment path, default), silu, or stochastic (the
diversity mode) -- never random by accident. `relu_finetune` (set by the schedule) forces ReLU
in training and eval.

Cost: the element mask is ~12 elementwise int64 ops over (B, T, F) (fused by torch.compile) plus
one bool per element kept for backward.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from models.config import StochasticConfig
from models.registry import ACTIVATIONS

if TYPE_CHECKING:
    from models.config import ModelConfig

MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D                 # lowbias32 multipliers (C. Wellons' hash prospector);
_MUL2 = 0x846CA68B - (1 << 32)     # written as a negative int64 so no product overflows 63 bits
_TAG_TOKEN, _TAG_CALL = 0x5EED0001, 0x5EED0002   # separate streams for per-token and per-call keys


def mix32(h: Any) -> Any:
    """A 32-bit integer hash (bijective on [0, 2^32)); works on Python ints and int64 tensors.

    Each product is < 2^63 in magnitude (h < 2^32, |multiplier| < 2^31), so int64 arithmetic is
    exact and `& MASK32` keeps the low 32 bits: the same result on every device.
    """
    h = h ^ (h >> 16)
    h = (h * _MUL1) & MASK32
    h = h ^ (h >> 15)
    h = (h * _MUL2) & MASK32
    return h ^ (h >> 16)


def absorb(h: Any, key: Any) -> Any:
    """Fold one 32-bit key into the running hash."""
    return mix32(h ^ (key & MASK32))


def _absorb64(h: Any, key: Any) -> Any:
    """Fold a (possibly > 32-bit) integer key: low word, then high word."""
    return absorb(absorb(h, key & MASK32), (key >> 32) & MASK32)


def silu_threshold(p: float) -> int:
    """Hashes below this pick SiLU: 0 for p=0 (never), 2^32 for p=1 (always)."""
    return min(int(p * 2.0**32), 1 << 32)


def token_hash(seed: int, layer: int, sample_index: torch.Tensor, start: int, n_pos: int) -> torch.Tensor:
    """(B, T) int64 hash of (seed, layer, global sample index, absolute position)."""
    prefix = absorb(_absorb64(mix32(_TAG_TOKEN), seed), layer)           # a Python int
    h = _absorb64(prefix, sample_index.to(torch.int64))                   # (B,)
    pos = torch.arange(start, start + n_pos, device=sample_index.device, dtype=torch.int64)
    return absorb(h[:, None], pos[None, :])                               # (B, T)


def call_hash(seed: int, layer: int, step: int) -> int:
    """Hash of (seed, layer, training step): the per-call draw."""
    return _absorb64(absorb(_absorb64(mix32(_TAG_CALL), seed), layer), step)


def silu_mask(shape: tuple[int, int, int], p: float, granularity: str, seed: int, layer: int,
              sample_index: torch.Tensor | None = None, start: int = 0, step: int = 0,
              device: torch.device | str = "cpu") -> torch.Tensor:
    """Boolean mask, True where SiLU is used, broadcastable to `shape` = (B, T, F).

    element: (B, T, F); token: (B, T, 1); call: (1, 1, 1).
    """
    B, T, Fdim = shape
    threshold = silu_threshold(p)
    if granularity == "call":
        return torch.full((1, 1, 1), call_hash(seed, layer, step) < threshold, device=device)
    if sample_index is None:
        sample_index = torch.zeros(B, dtype=torch.int64, device=device)
    if sample_index.shape != (B,):
        raise ValueError(f"sample_index must have shape ({B},), got {tuple(sample_index.shape)}")
    h = token_hash(seed, layer, sample_index.to(device), start, T)
    if granularity == "token":
        return (h < threshold)[:, :, None]
    if granularity != "element":
        raise ValueError(f"unknown granularity {granularity!r}")
    units = torch.arange(Fdim, device=device, dtype=torch.int64)
    return absorb(h[:, :, None], units[None, None, :]) < threshold


class _StochAFn(torch.autograd.Function):
    """where(mask, silu(u), relu(u)); the forward's mask is the one backward uses."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u, mask)
        return torch.where(mask, F.silu(u), F.relu(u))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, mask = ctx.saved_tensors
        relu_grad = torch.where(u > 0, grad, torch.zeros_like(grad))
        silu_grad = torch.ops.aten.silu_backward(grad, u)     # torch's own formula: p=1 is exactly SiLU
        return torch.where(mask, silu_grad, relu_grad), None


@ACTIVATIONS.register("stochastic")
class StochasticActivation(nn.Module):
    """StochA; configured by `model.ffn.stochastic`. Keyed by its layer index and the block context."""

    takes_context = True

    def __init__(self, dim: int = 0, cfg: ModelConfig | None = None, layer_idx: int = 0):
        super().__init__()
        sc = cfg.ffn.stochastic if cfg is not None else StochasticConfig()
        self.p = sc.p
        self.granularity = sc.granularity
        self.eval_mode = sc.eval_mode
        self.seed = sc.seed if sc.seed is not None else 0
        self.layer_idx = layer_idx
        self.relu_finetune = False      # set by the ReLU fine-tune schedule
        self.set_train_step(0)

    def set_train_step(self, step: int) -> None:
        """The training step (set by train/callbacks/activation_schedule.py before each step): it keys the
        `call` draw, decided here on the host so forward reads one bool (no device sync, and at
        most two torch.compile variants)."""
        self.step = step
        self.call_silu = call_hash(self.seed, self.layer_idx, step) < silu_threshold(self.p)

    def mode(self) -> str:
        """What forward computes now: relu | silu | stochastic."""
        if self.relu_finetune:
            return "relu"
        return "stochastic" if self.training else self.eval_mode

    def mask(self, u: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        """The SiLU mask for input u (B, T, F) under block context ctx (MixerContext or None)."""
        return silu_mask(tuple(u.shape), self.p, self.granularity, self.seed, self.layer_idx,
                         getattr(ctx, "sample_index", None), getattr(ctx, "start", 0), self.step, u.device)

    def forward(self, u: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        mode = self.mode()
        if mode == "relu":
            return F.relu(u)
        if mode == "silu":
            return F.silu(u)
        if u.dim() != 3:
            raise ValueError(f"stochastic activation expects (B, T, F) input, got shape {tuple(u.shape)}")
        if self.granularity == "call":               # one draw for the whole tensor (see set_train_step)
            return F.silu(u) if self.call_silu else F.relu(u)
        return _StochAFn.apply(u, self.mask(u, ctx))

    def extra_repr(self) -> str:
        return (f"p={self.p}, granularity={self.granularity}, eval_mode={self.eval_mode}, seed={self.seed}, "
                f"layer={self.layer_idx}" + (", relu_finetune=True" if self.relu_finetune else ""))
