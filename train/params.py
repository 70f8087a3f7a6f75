"""`ablate params`: parameter counts, FLOPs per token and the optimizer group table."""
from __future__ import annotations

import torch

import models
from models.flops import count_params, flops_per_token
from train.config import Config
from train.optim import group_table


def _fmt(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def params_report(cfg: Config) -> str:
    cfg.model.vocab_size = cfg.resolved_vocab_size()
    with torch.device("meta"):
        model = models.Decoder(cfg.model)
    counts = count_params(model)
    fpt = flops_per_token(model, cfg.data.seq_len)
    lines = [
        f"model: d_model={cfg.model.d_model} n_layers={cfg.model.n_layers} n_heads={cfg.model.n_heads} "
        f"vocab={cfg.model.vocab_size} seq_len={cfg.data.seq_len}",
        f"parameters:      {counts.total:>14,}  ({_fmt(counts.total)})",
        f"  embedding:     {counts.embedding:>14,}",
        f"  non-embedding: {counts.non_embedding:>14,}  ({_fmt(counts.non_embedding)})",
        f"  memory values: {counts.memory_values:>14,}",
        f"  in matmuls:    {counts.matmul:>14,}  (LM head included)",
        f"FLOPs per token (fwd+bwd): {fpt:,.0f}  ({_fmt(fpt)})",
        f"  per step: {fpt * cfg.train.global_batch * cfg.data.seq_len:.3e}",
        "",
        f"optimizer groups ({cfg.optim.name}, parameterization {cfg.model.param.kind}):",
    ]
    rows = group_table(model, cfg)
    header = ["group", "tensors", "params", "lr", "weight_decay", "eps", "init_std", "optimizer"]
    keys = ["name", "tensors", "params", "lr", "weight_decay", "eps", "init_std", "optimizer"]
    table = [header] + [[_cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return "\n".join(lines)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)
