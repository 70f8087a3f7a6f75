"""The forward every probe runs: the model in eval mode, no gradients, over fixed batches, its
train/eval mode restored afterwards. Under FSDP every rank must call it with the same batches."""
from __future__ import annotations

from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from train.runtime import autocast as default_autocast
from train.runtime import unwrap


def probe_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """`device`, or the model's own when None."""
    return torch.device(device) if device is not None else next(model.parameters()).device


@torch.no_grad()
def probe_forwards(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                   autocast: Callable[[], ContextManager] | None = None, **kwargs: Any) -> Iterator[Any]:
    """The model's output for each loader batch (`input_ids`, optional `doc_ids` and `indices`),
    under `autocast` (default: bf16 on CUDA); `kwargs` go to the forward (e.g. want_stats)."""
    decoder = unwrap(model)
    autocast = autocast or (lambda: default_autocast(device))
    was_training = model.training
    model.eval()
    try:
        for b in batches:
            doc_ids = b["doc_ids"].to(device) if decoder.cfg.doc_mask and "doc_ids" in b else None
            index = b["indices"].to(device) if "indices" in b else None
            with autocast():
                yield model(b["input_ids"].to(device), doc_ids=doc_ids, sample_index=index, **kwargs)
    finally:
        model.train(was_training)
