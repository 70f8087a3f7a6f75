"""LayerNorm removal by fine-tuning: norms that turn into fixed linear maps on a schedule.

Heimersheim, "You can remove GPT2's LayerNorm by fine-tuning" (arXiv 2409.13710). A trained,
normed model is fine-tuned while its norms are switched off one group at a time; a switched
("fake") norm divides by a frozen std instead of each token's own, so it is a linear map that
`ablate checkpoint fold-norms` (models/norm_fold.py) folds into the weights that read it.

- `RemovableNorm` is an RMSNorm or LayerNorm (same parameter names, so `init_from` a normed run
  needs no mapping) with three buffers: `fake`, `std` (the frozen divisor of ordinary positions,
  EOT tokens and position 0) and `special` (whether EOT tokens and position 0 still take their own
  std). Fake mode computes x * g / std + b, without mean subtraction (as the follow-up code of
  submarat/removing-layer-norm does); real mode is the norm itself. The output is selected with
  `torch.where`, not a Python branch, so a compiled block does not depend on the flags.
- The std a norm freezes is the mean over the last step's tokens (each position kind apart) of
  the divisor the real norm used: sqrt(mean x^2 + eps) for RMSNorm, sqrt(var x + eps) for
  LayerNorm. Every training forward adds (sum, count) per kind into the non-persistent `stats`
  buffer (an in-place add, so a compiled block neither breaks nor recompiles around it); the
  callback (train/callbacks/norm_removal.py) zeroes it before each step, and at a switch sums it
  over data-parallel ranks and freezes. An activation-checkpointing recomputation adds each
  forward twice: the mean is unchanged.
- `removal_schedule` is the order of the paper and the follow-up code: each layer's FFN-input
  norm, the attention-input norm on the q/k path, its copy on the v path, the final norm, then
  EOT tokens and position 0 give up their own std. The attention-input norm is duplicated (the
  Block's `mixer_norm_v`, initialised from `mixer_norm` through an `init_from` alias) so the two
  paths switch separately; mixers that take no separate value input have one input norm, switched
  with the q/k group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.context import Aux, LossTerm
from models.norms import compute_dtype

ORDINARY, EOT, BOS = 0, 1, 2          # position kinds: the rows of a norm's `std` buffer
KIND_NAMES = ("ordinary", "eot", "bos")
FAKE_GROUPS = ("ffn", "qk", "v", "final")   # groups whose switch freezes a std; eot / bos end a special case


class RemovableNorm(nn.Module):
    """An RMSNorm / LayerNorm that the removal schedule can turn into x * g / std + b."""

    # buffers `init_from` may leave at their initial values (a normed run has none of them)
    fresh_state = ("fake", "special", "std")

    def __init__(self, kind: str, dim: int, eps: float, aux_loss_weight: float = 0.0):
        super().__init__()
        if kind not in ("rmsnorm", "layernorm"):
            raise ValueError(f"RemovableNorm: kind must be rmsnorm or layernorm, got {kind!r}")
        self.kind, self.eps = kind, eps
        self.weight = nn.Parameter(torch.ones(dim))
        if kind == "layernorm":
            self.bias = nn.Parameter(torch.zeros(dim))
            self.param_tags = {"weight": "norm_gain", "bias": "norm_bias"}
        else:
            self.register_parameter("bias", None)
            self.param_tags = {"weight": "norm_gain"}
        self.register_buffer("fake", torch.tensor(False))
        self.register_buffer("special", torch.tensor([True, True]))     # EOT tokens, position 0
        self.register_buffer("std", torch.ones(3))                      # ordinary, EOT, position 0
        # (2, 3): sum and count of the real divisors per kind over this step's training forwards
        self.register_buffer("stats", torch.zeros(2, 3, dtype=torch.float64), persistent=False)
        # the final norm adds the auxiliary residual-std loss (`ln_aux`) in training
        self.aux_loss_weight = aux_loss_weight

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def reset_buffers(self) -> None:
        """The real, unswitched state (a meta-device build leaves buffers uninitialised)."""
        with torch.no_grad():
            self.fake.fill_(False)
            self.special.fill_(True)
            self.std.fill_(1.0)
            self.stats.zero_()

    @property
    def finished(self) -> bool:
        """Fake, with no special position left: one fixed scale, foldable."""
        return bool(self.fake) and not bool(self.special.any())

    def frozen(self, kinds: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """The frozen divisor of every position, (B, T, 1) (or a scalar without kinds)."""
        std = self.std.to(dtype)
        if kinds is None:
            return std[ORDINARY]
        table = torch.stack([std[ORDINARY], torch.where(self.special[0], std[EOT], std[ORDINARY]),
                             torch.where(self.special[1], std[BOS], std[ORDINARY])])
        return table[kinds].unsqueeze(-1)

    def forward(self, x: torch.Tensor, kinds: torch.Tensor | None = None) -> Any:
        dt = compute_dtype(x)
        xf = x.to(dt)
        if self.kind == "layernorm":
            mean = xf.mean(-1, keepdim=True)
            centred = xf - mean
            real = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps)
            num = torch.where(self.fake, xf, centred)          # fake: no mean subtraction
        else:
            real = torch.sqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
            num = xf
        if self.training:
            self._capture(real.detach(), kinds)
        y = num / torch.where(self.fake, self.frozen(kinds, dt), real) * self.weight.to(dt)
        if self.bias is not None:
            y = y + self.bias.to(dt)
        y = y.to(x.dtype)
        if self.aux_loss_weight > 0 and self.training:
            loss = residual_std_loss(xf, kinds)
            return y, Aux({"ln_aux": LossTerm(self.aux_loss_weight * loss, "mean")}, {})
        return y

    def _capture(self, real: torch.Tensor, kinds: torch.Tensor | None) -> None:
        """Add this forward's per-kind sums and counts of the real divisor to `stats`."""
        real = real.squeeze(-1).to(self.stats.dtype)                         # (B, T)
        if kinds is None:
            kinds = torch.zeros(real.shape, dtype=torch.long, device=real.device)
        onehot = F.one_hot(kinds, 3).to(real.dtype)                          # (B, T, 3)
        self.stats.add_(torch.stack([(real.unsqueeze(-1) * onehot).sum((0, 1)), onehot.sum((0, 1))]))

    @torch.no_grad()
    def freeze(self, stats: torch.Tensor) -> torch.Tensor:
        """Switch to fake with the stds of `stats` ((2, 3) sums and counts, summed over ranks); a
        kind that did not occur takes the ordinary std. Returns the three stds."""
        sums, counts = stats[0].double().cpu(), stats[1].double().cpu()
        if counts[ORDINARY] <= 0:
            raise RuntimeError("norm removal: no ordinary position was seen in the step before a switch")
        std = torch.where(counts > 0, sums / counts.clamp_min(1), sums[ORDINARY] / counts[ORDINARY])
        if not bool(torch.isfinite(std).all()):
            raise RuntimeError(f"norm removal: the step before this switch had non-finite activations "
                               f"(measured stds {std.tolist()}); a norm cannot freeze them")
        self.std.copy_(std.to(self.std.dtype))
        self.fake.fill_(True)
        return std

    @torch.no_grad()
    def end_special(self, kind: int) -> None:
        """EOT tokens (EOT) or position 0 (BOS) take the ordinary std from now on."""
        self.special[kind - 1] = False


def position_kinds(token_ids: torch.Tensor, start: int, pad_mask: torch.Tensor | None,
                   eot_token: int | None) -> torch.Tensor:
    """(B, T) kind of every position: EOT where the token is `eot_token`, BOS at each row's first
    token (absolute position 0; with a left-padding `pad_mask`, the row's first real token), else
    ordinary. Position 0 wins when it is an EOT token."""
    kinds = torch.zeros(token_ids.shape, dtype=torch.long, device=token_ids.device)
    if eot_token is not None:
        kinds[token_ids == eot_token] = EOT
    T = token_ids.shape[1]
    if pad_mask is None:
        if start == 0:
            kinds[:, 0] = BOS
    else:
        real = pad_mask[:, -T:]
        first = (pad_mask.long().cumsum(1) - 1)[:, -T:] == 0
        kinds[first & real] = BOS
    return kinds


def residual_std_loss(h: torch.Tensor, kinds: torch.Tensor | None) -> torch.Tensor:
    """Mean over positions of (std_t - target)^2, std_t the residual's std over features at
    position t and target its mean over ordinary positions (held fixed): it keeps the residual
    norms uniform while the final norm is switched off (the follow-up code's auxiliary loss)."""
    std = torch.sqrt(h.to(compute_dtype(h)).var(-1, unbiased=False) + 1e-5)     # (B, T)
    ordinary = std if kinds is None else std[kinds == ORDINARY]
    target = (ordinary if ordinary.numel() else std).mean().detach()
    return (std - target).pow(2).mean()


@dataclass(frozen=True)
class Switch:
    """One scheduled change: from 0-based step `step` on, `group` (ffn | qk | v | final: that
    layer's norm turns fake; eot | bos: every norm gives up that special std) is in effect."""

    step: int
    group: str
    layer: int | None = None

    def module_name(self) -> str | None:
        """The norm it switches (a module name of the Decoder); None for eot / bos (every norm)."""
        return {"ffn": f"blocks.{self.layer}.ffn_norm", "qk": f"blocks.{self.layer}.mixer_norm",
                "v": f"blocks.{self.layer}.mixer_norm_v", "final": "final_norm"}.get(self.group)


def removal_schedule(removal: Any, n_layers: int) -> list[Switch]:
    """The switches of `model.norm.removal` for an n_layers model, in order. Consecutive groups
    are one gap apart, as in the follow-up code: the first q/k norm one `gap_ffn` after the last
    FFN norm, the first v norm one `gap_qk` after the last q/k norm."""
    r, n = removal, n_layers
    ffn0 = r.start_step
    qk0 = ffn0 + n * r.gap_ffn
    v0 = qk0 + n * r.gap_qk
    final = v0 + (n - 1) * r.gap_v + r.final_after
    out = [Switch(ffn0 + i * r.gap_ffn, "ffn", i) for i in range(n)]
    out += [Switch(qk0 + i * r.gap_qk, "qk", i) for i in range(n)]
    out += [Switch(v0 + i * r.gap_v, "v", i) for i in range(n)]
    out += [Switch(final, "final"), Switch(final + r.eot_after, "eot"),
            Switch(final + r.eot_after + r.bos_after, "bos")]
    return out
