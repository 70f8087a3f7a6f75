"""Probes: measurements of a model beyond its loss, in the loop (as callbacks) and offline
(`ablate probe RUN_DIR [--step N] [--probes a,b]`).

PROBES is the registry `ablate probe --probes` picks from: name -> Probe, whose `fn(model,
batches, device)` returns per-layer values for one or more series ({series: [value or None per
layer]}; a series' name is its `probe` field in long-format rows and in probes.json). `applies`
says why a probe does not fit a model (None: it does); the default runs every probe that fits.

- `sparsity` (sparsity.py): fraction of exact zeros of each FFN activation
- `linearity` (linearity.py): linear-fit similarity of each block's output (`linearity`) and
  update (`linearity_no_residual`) to its input, after Razzhigaev et al., arXiv 2405.12250
- `entropy` (entropy.py): mean attention row entropy per layer (over heads) and the causal
  maximum log(t+1); per head in the training rows (`train.probe_every`)

`ablate probe` writes RUN_DIR/probes/step-XXXXXXXX/probes.json and a <probe>.png per probe
(matplotlib, the `plots` extra); `ablate compare` reads both those files and the probe rows.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from eval.probes.entropy import entropy_series, has_attention
from eval.probes.linearity import layer_linearity
from eval.probes.sparsity import _mode, ffn_activations, ffn_sparsity
from models.registry import ConfigError

PROBES_DIR = "probes"          # RUN_DIR/probes/step-XXXXXXXX/
PROBES_JSON = "probes.json"

Batches = list[dict[str, torch.Tensor]]


@dataclass(frozen=True)
class Probe:
    name: str
    doc: str
    fn: Callable[[nn.Module, Batches, torch.device | str], dict[str, list[float | None]]]
    applies: Callable[[nn.Module], str | None]     # None, or why the probe does not fit the model


def _sparsity(model: nn.Module, batches: Batches, device: torch.device | str) -> dict[str, list[float | None]]:
    return {"sparsity": ffn_sparsity(model, batches, device)}


def _has_activation(model: nn.Module) -> str | None:
    if any(a is not None for a in ffn_activations(model)):
        return None
    return "no layer's FFN has an activation (fused_linear or memory layers)"


PROBES: dict[str, Probe] = {
    "sparsity": Probe("sparsity", "FFN activation sparsity (fraction of exact zeros)", _sparsity, _has_activation),
    "linearity": Probe("linearity", "linear-fit similarity of each block's output and update to its input",
                       layer_linearity, lambda model: None),
    "entropy": Probe("entropy", "mean attention row entropy (nats) per layer, and the causal maximum log(t+1)",
                     entropy_series, has_attention),
}


def select(names: list[str] | None, model: nn.Module) -> tuple[list[Probe], dict[str, str]]:
    """The probes to run and {name: why skipped}: every one that applies by default; named ones
    must exist and apply (ConfigError naming --probes)."""
    if names is None:
        chosen = [p for p in PROBES.values() if p.applies(model) is None]
        return chosen, {p.name: p.applies(model) for p in PROBES.values() if p.applies(model) is not None}
    out = []
    for n in names:
        if n not in PROBES:
            raise ConfigError("--probes", f"unknown probe {n!r}; known: {', '.join(PROBES)}")
        reason = PROBES[n].applies(model)
        if reason is not None:
            raise ConfigError("--probes", f"{n} does not apply to this model: {reason}")
        out.append(PROBES[n])
    if not out:
        raise ConfigError("--probes", "no probe named")
    return out, {}


def run_probes(run_dir: str | Path, step: int | str | None = "latest", names: list[str] | None = None,
               n_batches: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Every selected probe on a run's checkpoint, over its first validation batches
    (`train.val_batches` of them unless n_batches); the result `ablate probe` prints and writes."""
    from train.data import DataError, fixed_batches, prepare_data
    from train.runtime import load_model

    model, cfg, found = load_model(run_dir, step, device)
    probes, skipped = select(names, model)
    data = prepare_data(cfg, progress=False)
    batches = fixed_batches(data.val_samples(cfg.data.seq_len), cfg.train.micro_batch,
                            n_batches or cfg.train.val_batches)
    if not batches:
        raise DataError("data.val_fraction", "the run's validation split has no window to probe")
    series: dict[str, dict[str, Any]] = {}
    for p in probes:
        for name, layers in p.fn(model, batches, device).items():
            vals = [v for v in layers if v is not None]
            series[name] = {"probe": p.name, "layers": layers, "mean": sum(vals) / len(vals) if vals else None}
    return {"run_dir": str(run_dir), "step": found, "tokens": sum(int(b["input_ids"].numel()) for b in batches),
            "batches": len(batches), "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
            "ffn": f"{cfg.model.ffn.kind}/{cfg.model.ffn.activation}", "ffn_mode": _mode(model),
            "probes": series, "skipped": skipped}


def format_probes(report: dict[str, Any]) -> str:
    """The table `ablate probe` prints: a row per layer, a column per series, then the means."""
    names = list(report["probes"])
    lines = [f"run: {report['run_dir']}  step: {report['step']}  tokens: {report['tokens']:,}  "
             f"ffn: {report['ffn']}  activation in eval: {report['ffn_mode']}"]
    width = max([len(n) for n in names] + [8])
    lines.append("layer  " + "  ".join(f"{n:>{width}}" for n in names))
    n_layers = max((len(s["layers"]) for s in report["probes"].values()), default=0)

    def cell(v: Any) -> str:
        return f"{'-' if v is None else f'{v:.4f}':>{width}}"

    for i in range(n_layers):
        lines.append(f"{i:>5}  " + "  ".join(cell(s["layers"][i] if i < len(s["layers"]) else None)
                                             for s in report["probes"].values()))
    lines.append(" mean  " + "  ".join(cell(s["mean"]) for s in report["probes"].values()))
    if "linearity" in report["probes"] and report["tokens"] < 10 * report["d_model"]:
        lines.append(f"note: {report['tokens']:,} tokens for d_model {report['d_model']}: the linear fit's optimism "
                     "(about d_model / tokens) inflates linearity; more --batches lower it")
    for name, why in report["skipped"].items():
        lines.append(f"skipped {name}: {why}")
    return "\n".join(lines)


def plot_probe(report: dict[str, Any], probe: str) -> bytes:
    """PNG of one probe's series per layer."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for name, s in report["probes"].items():
        if s["probe"] != probe:
            continue
        pts = [(i, v) for i, v in enumerate(s["layers"]) if v is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=4, label=name)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(probe)
    ax.set_title(f"{probe} per layer ({Path(report['run_dir']).name}, step {report['step']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def write_probes(report: dict[str, Any], run_dir: str | Path) -> list[Path]:
    """RUN_DIR/probes/step-XXXXXXXX/probes.json and <probe>.png per probe (the PNGs need
    matplotlib: without it a note goes to stderr and only the JSON is written)."""
    from train.rundir import atomic_write, step_name
    out = Path(run_dir) / PROBES_DIR / step_name(report["step"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / PROBES_JSON
    atomic_write(path, json.dumps({k: v for k, v in report.items() if k != "run_dir"}, indent=2) + "\n")
    written = [path]
    if importlib.util.find_spec("matplotlib") is None:
        print("ablate probe: no PNG plots: matplotlib is missing (pip install 'ablate[plots]')", file=sys.stderr)
        return written
    for probe in dict.fromkeys(s["probe"] for s in report["probes"].values()):
        png = out / f"{probe}.png"
        png.write_bytes(plot_probe(report, probe))
        written.append(png)
    return written
