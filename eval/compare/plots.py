"""The report's figures (matplotlib, Agg, no pyplot state): each function returns PNG bytes.

Curves over seeds are aligned by step: the line is the mean over the runs that logged that step,
the band +- one standard error where two or more did (a single seed gets a line only).
"""
from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from eval.compare.arms import Arm
from eval.compare.report import Comparison
from eval.compare.runs import Run

DPI = 110


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _series(run: Run, kind: str, x: str, y: str, vset: str | None = None) -> list[tuple[int, float, float]]:
    """(step, x, y) of one run's rows; x may be `tokens` or `time_s` (val rows take the train
    rows' wall time, interpolated by step)."""
    rows = [r for r in run.kind(kind) if vset is None or r.get("set", "heldout") == vset]
    if x == "time_s" and kind != "train":
        tr = [(r["step"], r["time_s"]) for r in run.kind("train") if isinstance(r.get("time_s"), (int, float))]
        if not tr:
            return []
        s, t = zip(*sorted(tr))
        return [(r["step"], float(np.interp(r["step"], s, t)), r[y]) for r in rows
                if isinstance(r.get(y), (int, float))]
    return [(r["step"], r[x], r[y]) for r in rows
            if isinstance(r.get(x), (int, float)) and isinstance(r.get(y), (int, float))]


def mean_curve(per_run: list[list[tuple[int, float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, mean y and standard error (NaN below two runs) per step over the runs."""
    by_step: dict[int, list[tuple[float, float]]] = {}
    for rows in per_run:
        for step, x, y in rows:
            by_step.setdefault(step, []).append((x, y))
    steps = sorted(by_step)
    xs = np.array([np.mean([p[0] for p in by_step[s]]) for s in steps])
    ys = np.array([np.mean([p[1] for p in by_step[s]]) for s in steps])
    se = np.array([np.std([p[1] for p in by_step[s]], ddof=1) / math.sqrt(len(by_step[s]))
                   if len(by_step[s]) > 1 else np.nan for s in steps])
    return xs, ys, se


def _curve_axes(ax: Any, arms: list[Arm], kind: str, x: str, y: str, vset: str | None, log_x: bool) -> bool:
    drawn = False
    for arm, color in zip(arms, _colors(len(arms))):
        xs, ys, se = mean_curve([_series(r, kind, x, y, vset) for r in arm.runs])
        if not len(xs):
            continue
        drawn = True
        ax.plot(xs, ys, color=color, label=f"{arm.name} (n={len(arm.runs)})", lw=1.4)
        ok = ~np.isnan(se)
        if ok.any():
            ax.fill_between(xs[ok], (ys - se)[ok], (ys + se)[ok], color=color, alpha=0.2, lw=0)
    if log_x and drawn:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    return drawn


def loss_curves(c: Comparison, x: str, log_x: bool = False) -> bytes | None:
    """Train loss and validation loss (the first set) against tokens or wall time."""
    vset = next((s for p in c.points.values() for s in p.val), None)
    fig = Figure(figsize=(11, 4))
    ax1, ax2 = fig.subplots(1, 2)
    xlabel = "tokens" if x == "tokens" else "wall time (s)"
    a = _curve_axes(ax1, c.arms, "train", x, "loss", None, log_x)
    b = _curve_axes(ax2, c.arms, "val", x, "val_loss", vset, log_x)
    if not (a or b):
        return None
    for ax, title in ((ax1, "train loss"), (ax2, f"validation loss ({vset})")):
        ax.set_xlabel(xlabel)
        ax.set_title(title)
    (ax2 if b else ax1).legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def _errorbar(ax: Any, xs: list[Any], pts: list[dict[str, Any]], color: Any, label: str) -> None:
    ys = [p["mean"] for p in pts]
    err = [p["sem"] if p["sem"] is not None else 0.0 for p in pts]
    ax.errorbar(xs, ys, yerr=err, color=color, marker="o", ms=4, capsize=3, label=label)


def grid_plot(c: Comparison, key: str) -> bytes | None:
    """The metric against one grid key, a line per (arm, other grid values), the best point of
    each line starred."""
    lines = [ln for ln in c.data["grid"].get(key, []) if any(p["mean"] is not None for p in ln["points"])]
    if not lines:
        return None
    values = [p["x"] for ln in lines for p in ln["points"]]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    cats = list(dict.fromkeys(map(str, values)))
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for ln, color in zip(lines, _colors(len(lines))):
        pts = [p for p in ln["points"] if p["mean"] is not None]
        xs = [p["x"] if numeric else cats.index(str(p["x"])) for p in pts]
        _errorbar(ax, xs, pts, color, ln["label"])
        best = next(p for p in pts if p["x"] == ln["best"])
        ax.plot([best["x"] if numeric else cats.index(str(best["x"]))], [best["mean"]], marker="*", ms=14,
                color=color, markeredgecolor="black", ls="none")
    if numeric and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    if not numeric:
        ax.set_xticks(range(len(cats)), cats)
    ax.set_xlabel(key)
    ax.set_ylabel(c.metric.label)
    ax.set_title(f"{c.metric.label} vs {key} at {c.at} (best starred)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def compute_plot(c: Comparison) -> bytes | None:
    """The metric against training FLOPs across the grid's sizes, log-log."""
    def drawable(p: dict[str, Any]) -> bool:              # log-log: positive values only
        return (p["mean"] or 0) > 0 and (p["flops"] or 0) > 0

    lines = [ln for ln in c.data["compute"] if any(map(drawable, ln["points"]))]
    if not lines:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for ln, color in zip(lines, _colors(len(lines))):
        pts = [p for p in ln["points"] if drawable(p)]
        _errorbar(ax, [p["flops"] for p in pts], pts, color, ln["label"])
    ax.set_xscale("log")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")         # a narrow loss range: no 10^x labels
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_xlabel("training FLOPs (FLOPs/token x tokens)")
    ax.set_ylabel(c.metric.label)
    ax.set_title(f"{c.metric.label} vs compute at {c.at}")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def probe_plot(c: Comparison, series: str) -> bytes | None:
    """One probe series per layer, a line per arm (mean over seeds, +- standard error band)."""
    arms = [(a, c.data["arms"][a.name]["probes"].get(series)) for a in c.arms]
    arms = [(a, s) for a, s in arms if s and any(l["mean"] is not None for l in s["layers"])]
    if not arms:
        return None
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    for (arm, s), color in zip(arms, _colors(len(arms))):
        idx = [i for i, l in enumerate(s["layers"]) if l["mean"] is not None]
        ys = np.array([s["layers"][i]["mean"] for i in idx])
        se = np.array([s["layers"][i]["sem"] if s["layers"][i]["sem"] is not None else np.nan for i in idx])
        ax.plot(idx, ys, marker="o", ms=4, color=color, label=arm.name)
        ok = ~np.isnan(se)
        if ok.any():
            ax.fill_between(np.array(idx)[ok], (ys - se)[ok], (ys + se)[ok], color=color, alpha=0.2, lw=0)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(series)
    ax.set_title(f"probe {series} per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _png(fig)


def figures(c: Comparison, log_x: bool = False) -> dict[str, bytes]:
    """{file name: PNG} of every figure that has data, in report order."""
    out: dict[str, bytes | None] = {
        "loss_vs_tokens.png": loss_curves(c, "tokens", log_x),
        "loss_vs_time.png": loss_curves(c, "time_s", log_x),
        "compute.png": compute_plot(c),
    }
    for key in c.grid_keys:
        out[f"grid_{key}.png"] = grid_plot(c, key)
    for s in dict.fromkeys(s for d in c.data["arms"].values() for s in d["probes"]):
        out[f"probe_{s}.png"] = probe_plot(c, s)
    return {k: v for k, v in out.items() if v is not None}
