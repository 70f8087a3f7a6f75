"""The attention entropy probe: each attention head's mean row entropy, per layer, against its
maximum, that of a uniform row over the keys a query sees (log(t+1) causal; log min(t+1, w) in a
window of w; counted within the document under `model.doc_mask`). LN-free models show
"entropic overload" (early heads near the maximum) and "entropy collapse" (deep heads near 0):
"ReLU's Revival" and "Entropy-Guided Attention for Private LLMs" (Jha & Reagen, arXiv 2410.09637,
2501.03489). The entropies come from the attention modules' side path (`want_stats`,
models/entropy.py), so the fused kernel's output is untouched.

- `attention_entropy(model, batches)`: {layer: (mean entropy per head, mean maximum)}
- `entropy_rows(...)`: long-format `probe` rows (probe `entropy`, layer, head, value, max)
- `EntropyProbe`: those rows every `train.probe_every` steps, on the first validation batch
"""
from __future__ import annotations

from typing import Any, Callable, ContextManager

import torch
from torch import nn

from train.callbacks import Callback, TrainState
from eval.probes.forward import probe_device, probe_forwards
from train.runtime import unwrap

PROBE = "entropy"


@torch.no_grad()
def attention_entropy(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device | str | None = None,
                      autocast: Callable[[], ContextManager] | None = None) -> dict[int, tuple[list[float], float]]:
    """{layer: ([mean row entropy of each head], mean maximum)} over `batches`, in eval mode (every
    rank must call it under FSDP). The model's train/eval mode is restored."""
    sums: dict[int, torch.Tensor] = {}
    maxima: dict[int, float] = {}        # summed over batches too: document masks differ by batch
    for out in probe_forwards(model, batches, probe_device(model, device), autocast, want_stats=True):
        for layer, value in out.stats.get("attn_entropy", {}).items():
            sums[layer] = sums.get(layer, 0) + value.double()
            maxima[layer] = maxima.get(layer, 0.0) + float(out.stats["attn_entropy_max"][layer])
    n = max(len(batches), 1)
    return {layer: ((s / n).tolist(), maxima[layer] / n) for layer, s in sorted(sums.items())}


def entropy_rows(model: nn.Module, batches: list[dict[str, torch.Tensor]], step: int,
                 device: torch.device | str | None = None,
                 autocast: Callable[[], ContextManager] | None = None) -> list[dict[str, Any]]:
    """One `probe` row per (attention layer, head): `value` its mean row entropy (nats), `max` the
    mean maximum over the same rows (log(t+1) for a causal row)."""
    return [{"kind": "probe", "step": step, "probe": PROBE, "layer": layer, "head": h, "value": v, "max": m}
            for layer, (heads, m) in attention_entropy(model, batches, device, autocast).items()
            for h, v in enumerate(heads)]


def entropy_series(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                   device: torch.device | str) -> dict[str, list[float | None]]:
    """`ablate probe --probes entropy`: per layer the mean over heads (None: not attention) and the
    causal maximum."""
    found = attention_entropy(model, batches, device)
    n = unwrap(model).cfg.n_layers
    mean = [sum(found[i][0]) / len(found[i][0]) if i in found else None for i in range(n)]
    return {"entropy": mean, "entropy_max": [found[i][1] if i in found else None for i in range(n)]}


def has_attention(model: nn.Module) -> str | None:
    cfg = unwrap(model).cfg
    kinds = {cfg.layers.mixers[x].kind for x in cfg.layers.letters(cfg.n_layers)}
    return None if "attention" in kinds else "no attention layer"


class EntropyProbe(Callback):
    """Every `train.probe_every` steps: the entropy rows on the first validation batch."""

    name = "entropy_probe"

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        every = state.cfg.train.probe_every
        if not every or state.step % every or not state.val_batches:
            return
        for row in entropy_rows(state.model, state.val_batches[:1], state.step, state.device, state.backend.autocast):
            state.log(row)
