"""FFN activation sparsity: the fraction of exact zeros in each layer's FFN hidden activation.

Measured on the activation's output, act(x W1) for an MLP and the gate's act(x W_gate) for a
GLU (as "Stochastic activations", arXiv 2509.22358, measures it: on act(xW)), with forward hooks, under
no_grad, in eval mode, so it is the deployment model's sparsity: ReLU after the fine-tune
switch, `model.ffn.stochastic.eval_mode` for StochA before it. Layers without an activation
(fused_linear, memory layers) report None.

- `ffn_sparsity(model, batches)`: per-layer fractions for some batches.
- `ffn_sparsity_rows(...)`: the long-format `probe` rows logged after each validation
  (`SparsityProbe`, a callback the composition root hands to the trainer).
- `sparsity_probe(run_dir, step)`: the same for a saved checkpoint on the run's validation
  batches (`ablate probe RUN_DIR [--step N]`); `format_sparsity` prints it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from train.callbacks import Callback, TrainState
from eval.probes.forward import probe_device, probe_forwards
from train.runtime import unwrap


def ffn_activations(model: nn.Module) -> list[nn.Module | None]:
    """Each layer's FFN activation module (None where the FFN has none)."""
    return [getattr(block.ffn, "act", None) for block in unwrap(model).blocks]


@torch.no_grad()
def ffn_sparsity(model: nn.Module, batches: list[dict[str, torch.Tensor]],
                 device: torch.device | str | None = None,
                 autocast: Callable[[], ContextManager] | None = None) -> list[float | None]:
    """Fraction of exact zeros of every layer's FFN activation output over `batches` (eval mode).

    Batches are loader dicts (`input_ids`, optional `doc_ids` and `indices`); `autocast` makes
    the precision context (default: bf16 on CUDA). Under FSDP every rank must call this with
    the same batches. The model's train/eval mode is restored afterwards.
    """
    device = probe_device(model, device)
    acts = ffn_activations(model)
    zeros = [torch.zeros((), dtype=torch.int64, device=device) for _ in acts]
    counts = [0 for _ in acts]

    def hook(i: int):
        def fn(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            zeros[i] += (output == 0).sum()
            counts[i] += output.numel()
        return fn

    handles = [a.register_forward_hook(hook(i)) for i, a in enumerate(acts) if a is not None]
    try:
        for _ in probe_forwards(model, batches, device, autocast):
            pass                    # the forward hooks collect
    finally:
        for h in handles:
            h.remove()
    return [float(z) / c if (a is not None and c) else None for a, z, c in zip(acts, zeros, counts)]


def mean_sparsity(layers: list[float | None]) -> float | None:
    vals = [v for v in layers if v is not None]
    return sum(vals) / len(vals) if vals else None


PROBE = "sparsity"      # the `ablate probe --probes` name, and the `probe` field of its rows


def probe_rows(probe: str, step: int, layers: list[float | None], overall: float | None) -> list[dict[str, Any]]:
    """Long-format `probe` rows: one per layer with a value, and the whole model's (layer null)."""
    rows = [{"kind": "probe", "step": step, "probe": probe, "layer": i, "head": None, "value": v}
            for i, v in enumerate(layers) if v is not None]
    if overall is not None:
        rows.append({"kind": "probe", "step": step, "probe": probe, "layer": None, "head": None, "value": overall})
    return rows


def ffn_sparsity_rows(model: nn.Module, batches: list[dict[str, torch.Tensor]], step: int,
                      device: torch.device | str | None = None,
                      autocast: Callable[[], ContextManager] | None = None) -> list[dict[str, Any]]:
    """The metrics.jsonl `probe` rows of step `step` (none when no layer has an activation): per
    layer its fraction of exact zeros, and (layer null) the mean over layers."""
    layers = ffn_sparsity(model, batches, device, autocast)
    return probe_rows(PROBE, step, layers, mean_sparsity(layers))


def _mode(model: nn.Module) -> str:
    """The activation a saved model runs in eval: e.g. 'relu (fine-tune)', 'stochastic', 'silu'."""
    modes = set()
    for act in ffn_activations(model):
        if act is None:
            continue
        if getattr(act, "relu_finetune", False):
            modes.add("relu (fine-tune)")
        elif hasattr(act, "eval_mode"):
            modes.add(f"{act.eval_mode} (eval_mode)")
        else:
            modes.add(type(act).__name__)
    return ", ".join(sorted(modes)) or "none"


def sparsity_probe(run_dir: str | Path, step: int | str | None = "latest", n_batches: int | None = None,
                   device: str | torch.device = "cpu") -> dict[str, Any]:
    """FFN sparsity of a run's checkpoint on its validation batches (`ablate probe`).

    The model gets the activation its last update trained with (the ReLU fine-tune switch
    included); n_batches defaults to `train.val_batches`.
    """
    from train.data import DataError, fixed_batches, prepare_data
    from train.runtime import load_model

    model, cfg, found = load_model(run_dir, step, device)      # with its last update's activation
    data = prepare_data(cfg, progress=False)
    batches = fixed_batches(data.val_samples(cfg.data.seq_len), cfg.train.micro_batch,
                            n_batches or cfg.train.val_batches)
    if not batches:
        raise DataError("data.val_fraction", "the run's validation split has no window to probe")
    layers = ffn_sparsity(model, batches, device)
    return {"run_dir": str(run_dir), "step": found, "ffn": f"{cfg.model.ffn.kind}/{cfg.model.ffn.activation}",
            "mode": _mode(model), "tokens": sum(int(b["input_ids"].numel()) for b in batches),
            "layers": layers, "mean": mean_sparsity(layers)}


def format_sparsity(report: dict[str, Any]) -> str:
    """Human-readable `ablate probe` output."""
    lines = [f"run: {report['run_dir']}  step: {report['step']}  ffn: {report['ffn']}  "
             f"activation in eval: {report['mode']}  tokens: {report['tokens']:,}",
             "FFN activation sparsity (fraction of exact zeros):"]
    for i, v in enumerate(report["layers"]):
        lines.append(f"  layer {i:>3}: " + ("-" if v is None else f"{v:.4f}"))
    mean = report["mean"]
    lines.append("  mean:      " + ("-" if mean is None else f"{mean:.4f}"))
    return "\n".join(lines)


class SparsityProbe(Callback):
    """After each validation: the FFN sparsity `probe` row on the first validation batch."""

    name = "sparsity_probe"

    def on_validation(self, state: TrainState, val: dict[str, Any]) -> None:
        for row in ffn_sparsity_rows(state.model, state.val_batches[:1], state.step, state.device,
                                     state.backend.autocast):
            state.log(row)
