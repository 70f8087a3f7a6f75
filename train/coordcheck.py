"""`ablate coordcheck`: do activations stay O(1) as the model grows? (muP's coordinate check)

At each width (at the config's depth) and each depth (at the config's width), the model trains
a few steps through the real `Trainer.train_step` (no run dir), and on one fixed batch we
measure the RMS of each activation at init and the RMS of its change after training:

    embedding   the token embeddings fed to the first block (after the input multiplier)
    mixer       the mixers' outputs, before the branch multiplier (over all layers)
    ffn         the FFNs' outputs, before the branch multiplier (over all layers)
    residual    the last block's output (the residual stream)
    logits      the output logits

A least-squares slope of log(value) against log(width) or log(depth) says how each quantity
scales: near 0 is flat (what muP promises across width, and CompleteP across depth, for the
changes), positive grows (SP's logit change grows with width under a fixed learning rate).
See "Tensor Programs V" (arXiv 2203.03466) and CompleteP (arXiv 2505.01618).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from train.config import Config, resolve_config

QUANTITIES = ("embedding", "mixer", "ffn", "residual", "logits")
FLAT = 0.2          # |slope| below this reads as flat


def _rms(t: torch.Tensor) -> float:
    return float(t.double().pow(2).mean().sqrt())


@torch.no_grad()
def capture(model: torch.nn.Module, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each quantity's activations on one batch (eval mode; the model's mode is restored)."""
    acts: dict[str, list[torch.Tensor]] = {q: [] for q in QUANTITIES}
    hooks = [model.blocks[0].register_forward_pre_hook(lambda m, args: acts["embedding"].append(args[0].clone()))]
    for block in model.blocks:
        hooks.append(block.mixer.register_forward_hook(
            lambda m, a, out: acts["mixer"].append((out[0] if isinstance(out, tuple) else out).clone())))
        hooks.append(block.ffn.register_forward_hook(
            lambda m, a, out: acts["ffn"].append((out[0] if isinstance(out, tuple) else out).clone())))
    hooks.append(model.blocks[-1].register_forward_hook(lambda m, a, out: acts["residual"].append(out[0].clone())))
    was_training = model.training
    model.eval()
    try:
        acts["logits"].append(model(input_ids).logits.clone())
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return {q: torch.stack(v) for q, v in acts.items()}


def measure(cfg: Config, batches: list[dict[str, torch.Tensor]], steps: int) -> dict[str, float]:
    """Train `steps` updates on `batches` (cycled, `accum` per step) through Trainer.train_step and
    return {quantity: RMS at init, quantity_delta: RMS of the change} on the first batch."""
    from train.trainer import Trainer

    trainer = Trainer(cfg)
    state = trainer.build()
    probe = batches[0]["input_ids"].to(trainer.device)
    before = capture(state.model, probe)
    for i in range(steps):
        trainer.train_step([batches[(i * trainer.accum + j) % len(batches)] for j in range(trainer.accum)])
    after = capture(state.model, probe)
    out: dict[str, float] = {}
    for q in QUANTITIES:
        out[q] = _rms(before[q])
        out[f"{q}_delta"] = _rms(after[q] - before[q])
    return out


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    return float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-30)), 1)[0])


def shape_config(cfg: Config, width: int | None = None, depth: int | None = None, seed: int | None = None) -> Config:
    """`cfg` at another width (d_model) or depth (n_layers); heads as configured."""
    c = copy.deepcopy(cfg)
    if width is not None:
        if width % c.model.n_heads:
            from models.registry import ConfigError
            raise ConfigError("--widths", f"width {width} is not a multiple of model.n_heads={c.model.n_heads}")
        c.model.d_model = width
    if depth is not None:
        c.model.n_layers = depth
        if isinstance(c.model.layers.pattern, list):
            c.model.layers.pattern = (c.model.layers.pattern * depth)[:depth]
    if seed is not None:
        c.seed = seed
    c.train.progress = False
    return c


def data_batches(cfg: Config, n: int) -> list[dict[str, torch.Tensor]]:
    """n micro-batches of the config's own training data (prepared and cached as for training)."""
    from train.data import Loader, prepare_data
    data = prepare_data(cfg, progress=False)
    resolve_config(cfg, data.vocab_size)
    loader = Loader(data.train_samples(cfg.data.seq_len, cfg.data.seed), cfg.train.micro_batch)
    return [loader.next_batch() for _ in range(n)]


def coordcheck(cfg: Config, widths: list[int], depths: list[int], steps: int = 10,
               batches: Callable[[Config], list[dict[str, torch.Tensor]]] | None = None) -> dict[str, Any]:
    """Measurements and fitted slopes across widths and depths. `batches(cfg)` gives the data
    (default: the config's own training data; `train.bench.random_batches` for random tokens)."""
    if batches is None:              # the config's data, prepared once: it does not depend on the shape
        own = data_batches(cfg, max(1, cfg.train.global_batch // cfg.train.micro_batch) * min(steps, 4))
        batches = lambda c: own     # noqa: E731
    resolve_config(cfg)
    result: dict[str, Any] = {"kind": cfg.model.param.kind, "steps": steps, "lr": cfg.optim.lr, "sweeps": {}}
    for axis, values in (("width", widths), ("depth", depths)):
        if not values:
            continue
        rows = []
        for v in values:
            c = shape_config(cfg, width=v if axis == "width" else None, depth=v if axis == "depth" else None)
            rows.append({axis: v, **measure(c, batches(c), steps)})
        keys = [k for k in rows[0] if k != axis]
        slopes = {k: slope([r[axis] for r in rows], [r[k] for r in rows]) for k in keys}
        result["sweeps"][axis] = {"rows": rows, "slopes": slopes}
    return result


def format_report(result: dict[str, Any]) -> str:
    lines = [f"coordinate check: param.kind={result['kind']}, {result['steps']} steps at lr {result['lr']:g}"]
    for axis, sweep in result["sweeps"].items():
        rows, slopes = sweep["rows"], sweep["slopes"]
        names = list(slopes)
        lines.append(f"\nacross {axis} ({', '.join(str(r[axis]) for r in rows)}): RMS at init and RMS change after training")
        lines.append(f"  {axis:>6} " + " ".join(f"{n:>14}" for n in names))
        for r in rows:
            lines.append(f"  {r[axis]:>6} " + " ".join(f"{r[n]:>14.4g}" for n in names))
        lines.append(f"  {'slope':>6} " + " ".join(f"{slopes[n]:>14.3f}" for n in names))
        for n in names:
            s = slopes[n]
            verdict = "flat" if abs(s) < FLAT else ("grows" if s > 0 else "shrinks")
            lines.append(f"  {n} vs {axis}: {verdict} (log-log slope {s:+.2f})")
    return "\n".join(lines)


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """result.json and one PNG per sweep (log-log, one line per quantity); PNGs need matplotlib
    (the `plots` extra)."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "coordcheck.json"]
    written[0].write_text(json.dumps(result, indent=1) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    for axis, sweep in result["sweeps"].items():
        rows = sweep["rows"]
        xs = [r[axis] for r in rows]
        fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
        for q in QUANTITIES:
            ax0.plot(xs, [r[q] for r in rows], marker="o", label=f"{q} ({sweep['slopes'][q]:+.2f})")
            ax1.plot(xs, [r[f"{q}_delta"] for r in rows], marker="o",
                     label=f"{q} ({sweep['slopes'][q + '_delta']:+.2f})")
        for ax, title in ((ax0, "RMS at init"), (ax1, f"RMS change after {result['steps']} steps")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_title(f"{title} ({result['kind']})")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / f"coordcheck_{axis}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written

