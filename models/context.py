"""What flows between the decoder, its blocks and their slot modules, besides hidden states.

- `MixerContext`: per-forward inputs every mixer, FFN, activation or memory layer may read.
- `LossTerm` / `Aux`: what a module may return beside its output tensor: named loss terms (each
  with its reduction) and per-layer statistics.
- `ModelOutput`: what `Decoder.forward` returns. It is a dataclass registered as a pytree node,
  so FSDP2's and DDP's forward hooks see the tensors inside it.

A technique that needs an auxiliary loss returns `(y, Aux(losses={"name": LossTerm(v, "mean")}))`
from its module (already weighted by its own coefficient); the decoder adds same-named terms
across layers; the trainer only sums them by reduction. Nothing here imports a technique.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.utils._pytree as pytree

Reduction = Literal["sum", "mean"]


class LossTerm(NamedTuple):
    """One named loss term: a 0-d fp32 tensor and how the trainer normalises it.

    `sum`: summed over target tokens (the trainer divides by the step's target-token count, as
    for cross-entropy); `mean`: already a mean (the trainer averages it over micro-batches and
    data-parallel ranks). A term that wants a mean over layers divides by the layer count itself.
    """

    value: torch.Tensor
    reduction: Reduction


class Aux(NamedTuple):
    """A module's side outputs: named loss terms and detached statistics (name -> tensor)."""

    losses: dict[str, LossTerm]
    stats: dict[str, torch.Tensor]


def empty_aux() -> Aux:
    return Aux({}, {})


def add_losses(into: dict[str, LossTerm], terms: dict[str, LossTerm]) -> dict[str, LossTerm]:
    """Add same-named terms (their reductions must agree); returns `into`."""
    for name, term in terms.items():
        old = into.get(name)
        if old is None:
            into[name] = term
        elif old.reduction != term.reduction:
            raise ValueError(f"loss term '{name}' is returned with reductions '{old.reduction}' and "
                             f"'{term.reduction}'; one name must have one reduction")
        else:
            into[name] = LossTerm(old.value + term.value, term.reduction)
    return into


def merge_aux(*parts: Aux | None) -> Aux:
    """One Aux from several (a block's mixer and FFN); statistics of one name must not collide."""
    losses: dict[str, LossTerm] = {}
    stats: dict[str, torch.Tensor] = {}
    for part in parts:
        if part is None:
            continue
        add_losses(losses, part.losses)
        for name, value in part.stats.items():
            if name in stats:
                raise ValueError(f"statistic '{name}' is returned twice by one block")
            stats[name] = value
    return Aux(losses, stats)


def split_output(out: torch.Tensor | tuple[torch.Tensor, Aux]) -> tuple[torch.Tensor, Aux | None]:
    """A slot module's return value as (tensor, Aux or None)."""
    if isinstance(out, tuple):
        y, aux = out
        return y, aux
    return out, None


@dataclass
class MixerContext:
    """What every mixer (and context-taking FFN, activation or memory layer) may need besides
    its input: positions, RoPE tables, token and document ids, the global sample index of each
    row, and whether statistics are wanted."""

    start: int                                  # absolute position of the first token of x
    cos: torch.Tensor                           # (T, Dh) RoPE tables; (B, T, Dh) per row with a pad_mask
    sin: torch.Tensor
    doc_ids: torch.Tensor | None = None         # (B, T) document id of every token, for doc masking
    sample_index: torch.Tensor | None = None    # (B,) global sample index of each row (keys stochastic masks)
    token_ids: torch.Tensor | None = None       # (B, T) input token ids (hash-keyed lookups, probes)
    want_stats: bool = False                    # modules fill Aux.stats only when True
    shared: Any = None                          # the decoder's shared modules (e.g. a memory value table)
    pad_mask: torch.Tensor | None = None        # (B, S) True at real tokens over the cached and new positions
                                                # (left padding: the Hugging Face export); mixers that honour it
                                                # set `takes_pad_mask = True`
    norm_kinds: torch.Tensor | None = None      # (B, T) position kinds for removable norms (models/norm_removal.py):
                                                # 0 ordinary, 1 EOT token, 2 first token; None without model.norm.removal


@dataclass
class ModelOutput:
    """`Decoder.forward`'s result.

    logits: (B, T, V), returned when no labels are given or with `return_logits=True`.
    losses: name -> LossTerm: `ce` (summed over target tokens), `z` (z-loss, summed), and every
        term the blocks returned. stats: name -> layer index -> detached tensor (`want_stats`).
    cache: the decode cache, updated in place, when one was passed.
    """

    logits: torch.Tensor | None = None
    losses: dict[str, LossTerm] = field(default_factory=dict)
    stats: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    cache: Any = None


pytree.register_dataclass(ModelOutput)
