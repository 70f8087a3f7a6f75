"""Optimizer construction: parameter groups from tags, AdamW or Muon, and the lr setter.

Groups are built only from each parameter's TagSpec (`models.tags.param_specs(model)`) and the
model's parameterization (`group_rule(spec) -> GroupRule(lr_mult, wd_mult, eps_mult, lr)`),
never from parameter or tag names, so a new technique lands in the right group by registering
and using its tags, and muP / CompleteP change per-group lr / weight decay / eps in one place.

Group keys: torch's `params`, `lr`, `weight_decay`, `eps`, plus metadata that torch carries
through state_dict untouched: `name` (the tag, "/muon" appended for Muon groups), `tag`,
`base_lr` (the group's peak lr; `set_lr` multiplies it by the schedule factor each step) and
`use_muon` (which update rule `train.muon.Muon` applies; False everywhere under AdamW).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.tags import TagSpec, param_specs, tag_spec
from train.config import Config
from train.muon import Muon
from train.runtime import unwrap


def _parameterization(model: nn.Module) -> Any:
    """The model's `param` (parameterization), through DDP / DeepSpeed / torch.compile wrappers."""
    return unwrap(model).param


def muon_weight_decay(cfg: Config) -> float:
    """optim.muon.weight_decay, or optim.weight_decay when it is null (0.0 is kept as 0.0)."""
    wd = cfg.optim.muon.weight_decay
    return cfg.optim.weight_decay if wd is None else wd


def _uses_muon(cfg: Config, spec: TagSpec, p: torch.Tensor) -> bool:
    """Muon takes 2-D matrices whose spec allows it (hidden matrices); everything else (and
    everything under adamw) is AdamW."""
    return cfg.optim.name == "muon" and spec.muon_ok and p.ndim == 2


def param_groups(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """One group per (tag, uses Muon), in order of first appearance; frozen params are left out.

    AdamW groups: lr = optim.lr * lr_mult (or the rule's absolute lr), weight_decay =
    optim.weight_decay * wd_mult.
    Muon groups:  lr = optim.muon.lr, weight_decay = muon_weight_decay(cfg) * wd_mult. The tag's
    lr_mult is not applied: it is an Adam-side width/depth correction, while Muon's
    max(1, rows/cols)^0.5 scaling already sets a per-shape step size.
    Every group: eps = optim.eps * eps_mult (only AdamW groups use it).
    """
    specs = param_specs(model)
    named = dict(model.named_parameters(remove_duplicate=False))
    rule_of = _parameterization(model).group_rule
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, spec in specs.items():
        p = named[name]
        if not p.requires_grad:
            continue
        use_muon = _uses_muon(cfg, spec, p)
        tag = spec.name
        key = (tag, use_muon)
        if key not in groups:
            rule = rule_of(spec)
            if use_muon:
                lr, wd = cfg.optim.muon.lr, muon_weight_decay(cfg) * rule.wd_mult
            else:
                lr = rule.lr if rule.lr is not None else cfg.optim.lr * rule.lr_mult
                wd = cfg.optim.weight_decay * rule.wd_mult
            groups[key] = {"params": [], "lr": lr, "weight_decay": wd, "eps": cfg.optim.eps * rule.eps_mult,
                           "name": f"{tag}/muon" if use_muon else tag, "tag": tag, "base_lr": lr,
                           "use_muon": use_muon}
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """torch AdamW (fused when optim.fused, or when it is null and the params are on CUDA;
    foreach otherwise) or `train.muon.Muon`, over `param_groups(model, cfg)`."""
    groups = param_groups(model, cfg)
    o = cfg.optim
    if not groups:
        raise ValueError("the model has no trainable parameters")
    if o.name == "adamw":
        on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
        fused = o.fused if o.fused is not None else on_cuda
        impl = {"fused": True} if fused else {"foreach": True}
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps,
                                 weight_decay=o.weight_decay, **impl)
    if o.name == "muon":
        return Muon(groups, lr=o.muon.lr, momentum=o.muon.momentum, nesterov=o.muon.nesterov,
                    ns_steps=o.muon.ns_steps, betas=tuple(o.betas), eps=o.eps,
                    weight_decay=o.weight_decay)
    raise ValueError(f"unknown optimizer {o.name!r} (known: adamw, muon)")


def group_table(model: nn.Module, cfg: Config) -> list[dict[str, Any]]:
    """One row per optimizer group, for `ablate params`.

    Keys: name (the group's name), tag, role, tensors, params, lr, weight_decay, eps, init_std, optimizer. init_std is the
    parameterization's std for the tag (before any residual-output scaling), or None for groups
    without matrices (vectors are initialised by their module, e.g. norm gains to 1).
    """
    param = _parameterization(model)
    rows = []
    for g in param_groups(model, cfg):
        spec = tag_spec(g["tag"])
        has_matrix = any(p.ndim >= 2 for p in g["params"])
        rows.append({
            "name": g["name"],
            "tag": g["tag"],
            "role": spec.role,
            "tensors": len(g["params"]),
            "params": sum(p.numel() for p in g["params"]),
            "lr": g["lr"],
            "weight_decay": g["weight_decay"],
            "eps": g["eps"],
            "init_std": param.init_std(spec) if (has_matrix and spec.init == "normal") else None,
            "optimizer": "muon" if g["use_muon"] else "adamw",
        })
    return rows


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """lr = base_lr * factor in every group (the schedule factor of `train.schedule.lr_factor`)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
