"""`ablate params`: parameter counts, FLOPs per token and the optimizer group table."""
from __future__ import annotations

from pathlib import Path

import torch

import models
from models.flops import count_params, flops_per_token
from train.config import Config, resolve_config
from train.optim import group_table


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def params_report(cfg: Config) -> str:
    resolve_config(cfg)
    with torch.device("meta"):
        model = models.Decoder(cfg.model)
    counts = count_params(model)
    fpt = flops_per_token(model, cfg.data.seq_len)
    lines = [
        f"model: d_model={cfg.model.d_model} n_layers={cfg.model.n_layers} n_heads={cfg.model.n_heads} "
        f"vocab={cfg.model.vocab_size} seq_len={cfg.data.seq_len}",
        ffn_line(model, cfg),
        f"parameters:      {counts.total:>14,}  ({_fmt(counts.total)})",
        f"  embedding:     {counts.embedding:>14,}",
        f"  non-embedding: {counts.non_embedding:>14,}  ({_fmt(counts.non_embedding)})",
        f"  memory values: {counts.memory_values:>14,}",
        f"  in matmuls:    {counts.matmul:>14,}  (LM head included)",
        f"FLOPs per token (fwd+bwd): {fpt:,.0f}  ({_fmt(fpt)})",
        f"  per step: {fpt * cfg.train.global_batch * cfg.data.seq_len:.3e}",
        "",
        param_line(model, cfg),
        "",
        f"optimizer groups ({cfg.optim.name}, parameterization {cfg.model.param.kind}):",
    ]
    rows = group_table(model, cfg)
    header = ["group", "tag", "role", "tensors", "params", "lr", "weight_decay", "eps", "init_std", "optimizer"]
    keys = ["name", "tag", "role", "tensors", "params", "lr", "weight_decay", "eps", "init_std", "optimizer"]
    table = [header] + [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def param_line(model: torch.nn.Module, cfg: Config) -> str:
    """The parameterization's forward multipliers: residual branch, input, output (logit), attention."""
    p, pc = model.param, cfg.model.param
    scale = p.attention_scale(cfg.model.head_dim)
    attn = f"1/sqrt({cfg.model.head_dim})" if scale is None else f"{scale:.6g}"
    shape = (f"  (width x{cfg.model.d_model / pc.base_width:g} of {pc.base_width}, depth x"
             f"{cfg.model.n_layers / pc.base_depth:g} of {pc.base_depth})" if pc.kind != "sp" else "")
    return (f"parameterization {pc.kind}{shape}: branch multiplier {p.residual_multiplier:.6g}, input multiplier "
            f"{p.input_multiplier:.6g}, logit multiplier {p.output_multiplier:.6g}, attention scale {attn}")


def ffn_line(model: torch.nn.Module, cfg: Config) -> str:
    """The FFN arm: kind/activation, hidden width, parameters per layer, ReLU fine-tune switch."""
    ffn_cfg = cfg.model.ffn
    block = next((b for b in model.blocks if b.layer_idx not in cfg.model.memory.layers), None)
    if block is None:
        return f"ffn: {ffn_cfg.kind}/{ffn_cfg.activation} (every layer is a memory layer)"
    ffn = block.ffn
    hidden = getattr(ffn, "hidden", None)
    per_layer = sum(p.numel() for p in ffn.parameters())
    act = getattr(ffn, "act", None)
    scalars = sum(p.numel() for p in act.parameters()) if act is not None else 0
    text = (f"ffn: {ffn_cfg.kind}/{ffn_cfg.activation}  hidden {hidden if hidden is not None else '-'}"
            f"{' (auto)' if ffn_cfg.hidden == 'auto' else ''}  params/layer {per_layer:,}"
            + (f" (activation scalars {scalars})" if scalars else ""))
    if ffn_cfg.activation == "stochastic":
        sc = ffn_cfg.stochastic
        text += f"  stochastic p={sc.p} {sc.granularity} eval={sc.eval_mode}"
    from train.callbacks.activation_schedule import relu_switch_step
    switch = relu_switch_step(cfg.train.steps, ffn_cfg.relu_finetune_frac)
    if switch is not None:
        text += f"  ReLU fine-tune from step {switch} of {cfg.train.steps}"
    return text


def arm_counts(paths: list[str | Path], overrides: list[str] | None = None) -> list[dict]:
    """Parameter counts of several configs (ablation arms), each with the same `overrides` (so a
    shape change applies to every arm alike); the first is the baseline."""
    from train.config import load_config
    rows = []
    for path in paths:
        cfg = load_config(path, overrides)
        resolve_config(cfg)
        with torch.device("meta"):
            model = models.Decoder(cfg.model)
        counts = count_params(model)
        rows.append({"arm": Path(path).stem, "ffn": f"{cfg.model.ffn.kind}/{cfg.model.ffn.activation}",
                     "hidden": getattr(model.blocks[0].ffn, "hidden", None), "total": counts.total,
                     "non_embedding": counts.non_embedding})
    base = rows[0]["non_embedding"] if rows else 0
    for r in rows:
        r["vs_baseline"] = (r["non_embedding"] - base) / base if base else 0.0
    return rows


def arms_report(paths: list[str | Path], overrides: list[str] | None = None) -> str:
    """`ablate params A.yaml B.yaml ... [KEY=VALUE ...]`: one line per arm, non-embedding counts
    vs the first."""
    rows = arm_counts(paths, overrides)
    table = [["arm", "ffn", "hidden", "total", "non-embedding", "vs first"]]
    table += [[r["arm"], r["ffn"], str(r["hidden"] or "-"), f"{r['total']:,}", f"{r['non_embedding']:,}",
               f"{100 * r['vs_baseline']:+.3f}%"] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in table)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
