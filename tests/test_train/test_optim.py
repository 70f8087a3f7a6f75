"""Optimizer groups from tags, torch AdamW / Muon construction, Newton–Schulz and Muon updates."""
from __future__ import annotations

import io
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import models
from models.parameterization import GroupRule
from models.tags import HIDDEN_MATRIX, TagSpec
from train.config import Config, config_from_dict
from train.muon import Muon, newton_schulz
from train.optim import build_optimizer, group_table, param_groups, set_lr

SMALL = {"d_model": 64, "n_layers": 2, "n_heads": 4, "vocab_size": 320}
VOCAB = 320
# Untied head, FFN biases and LayerNorm: every built-in tag appears (except scalar).
FULL = {**SMALL, "tie_embeddings": False, "ffn": {"bias": True},
        "norm": {"block": "layernorm", "final": "layernorm"}}


def make(model: dict[str, Any] | None = None, **optim: Any) -> tuple[models.Decoder, Config]:
    torch.manual_seed(0)
    # The smallest BPE tokenizer (260) lets the model's vocabulary stay small.
    cfg = config_from_dict({"model": model or SMALL, "tokenizer": {"vocab_size": 260}, "optim": optim})
    return models.Decoder(cfg.model), cfg


def batch(seed: int = 1, b: int = 4, t: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (b, t + 1), generator=g)


def loss_of(model: models.Decoder, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids[:, :-1]).logits
    return F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def train(model: models.Decoder, opt: torch.optim.Optimizer, ids: torch.Tensor, steps: int) -> list[float]:
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(model, ids)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- groups
@pytest.mark.parametrize("name", ["adamw", "muon"])
@pytest.mark.parametrize("arch", [SMALL, FULL], ids=["tied", "full"])
def test_every_param_in_exactly_one_group(name: str, arch: dict) -> None:
    model, cfg = make(arch, name=name)
    groups = param_groups(model, cfg)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert all(g["params"] for g in groups)
    names = [g["name"] for g in groups]
    assert len(names) == len(set(names))


def test_groups_follow_sp_rules() -> None:
    model, cfg = make(FULL, lr=1e-3, weight_decay=0.05, eps=1e-7)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert set(groups) == {"embedding", "hidden_matrix", "hidden_bias", "norm_gain", "norm_bias", "final_norm_gain",
                           "final_norm_bias", "output_head"}
    for g in groups.values():
        assert g["tag"] == g["name"] and g["use_muon"] is False
        assert g["lr"] == g["base_lr"] == 1e-3
        assert g["eps"] == 1e-7
        # SP's rule: weight decay on hidden matrices only.
        assert g["weight_decay"] == (0.05 if g["tag"] == HIDDEN_MATRIX.name else 0.0)
    assert groups["hidden_matrix"]["weight_decay"] == 0.05
    assert all(p.ndim == 2 for p in groups["hidden_matrix"]["params"])
    assert all(p.ndim == 1 for t in ("hidden_bias", "norm_gain", "norm_bias") for p in groups[t]["params"])


def test_groups_come_from_tags_and_group_rule_not_names(monkeypatch: pytest.MonkeyPatch) -> None:
    model, cfg = make(SMALL, lr=1e-3, weight_decay=0.1, eps=1e-8)
    model.embed.param_tags = {"weight": "scalar"}         # retag: the group must follow the tag

    def rule(spec: TagSpec) -> GroupRule:
        if spec.name == "scalar":
            return GroupRule(lr=7e-4, wd_mult=0.0)             # an absolute lr replaces lr * lr_mult
        return GroupRule(lr_mult=0.5, wd_mult=2.0, eps_mult=3.0) if spec.matrix else GroupRule(wd_mult=0.0)

    monkeypatch.setattr(model.param, "group_rule", rule)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert "embedding" not in groups and groups["scalar"]["params"] == [model.embed.weight]
    hm = groups["hidden_matrix"]
    assert hm["lr"] == hm["base_lr"] == pytest.approx(5e-4)
    assert hm["weight_decay"] == pytest.approx(0.2) and hm["eps"] == pytest.approx(3e-8)
    assert groups["scalar"]["weight_decay"] == 0.0
    assert groups["scalar"]["lr"] == groups["scalar"]["base_lr"] == 7e-4


def test_frozen_params_skipped_and_empty_groups_dropped() -> None:
    model, cfg = make(SMALL)
    for m in model.modules():
        if getattr(m, "param_tags", {}).get("weight") == "norm_gain":
            m.weight.requires_grad_(False)
    groups = param_groups(model, cfg)
    assert "norm_gain" not in [g["name"] for g in groups]
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_muon_groups_only_hidden_matrices() -> None:
    model, cfg = make(FULL, name="muon", lr=1e-3, weight_decay=0.1, muon={"lr": 0.03})
    groups = param_groups(model, cfg)
    muon = [g for g in groups if g["use_muon"]]
    assert [g["name"] for g in muon] == ["hidden_matrix/muon"]
    assert all(p.ndim == 2 for p in muon[0]["params"])
    assert muon[0]["tag"] == HIDDEN_MATRIX.name
    assert muon[0]["lr"] == muon[0]["base_lr"] == 0.03
    assert muon[0]["weight_decay"] == 0.1                  # muon.weight_decay null -> optim's
    assert "hidden_matrix" not in [g["name"] for g in groups]  # all hidden matrices are 2-D here
    for g in groups:
        if not g["use_muon"]:
            assert g["tag"] != HIDDEN_MATRIX.name and g["lr"] == 1e-3
    # An explicit 0.0 is kept, not replaced by optim.weight_decay.
    model, cfg = make(FULL, name="muon", weight_decay=0.1, muon={"weight_decay": 0.0})
    assert [g["weight_decay"] for g in param_groups(model, cfg) if g["use_muon"]] == [0.0]


def test_group_table_rows() -> None:
    model, cfg = make(SMALL, name="muon", lr=1e-3)
    rows = group_table(model, cfg)
    by = {r["name"]: r for r in rows}
    assert set(by) == {"embedding", "hidden_matrix/muon", "norm_gain", "final_norm_gain"}
    assert set(rows[0]) == {"name", "tag", "role", "tensors", "params", "lr", "weight_decay", "eps", "init_std",
                            "optimizer"}
    assert sum(r["params"] for r in rows) == sum(p.numel() for p in model.parameters())
    assert sum(r["tensors"] for r in rows) == len(list(model.parameters()))
    assert by["embedding"]["params"] == VOCAB * 64 and by["embedding"]["tensors"] == 1
    assert by["hidden_matrix/muon"]["optimizer"] == "muon" and by["hidden_matrix/muon"]["lr"] == 0.02
    assert by["embedding"]["optimizer"] == by["norm_gain"]["optimizer"] == "adamw"
    assert by["embedding"]["init_std"] == by["hidden_matrix/muon"]["init_std"] == 0.02
    assert by["norm_gain"]["init_std"] is None and by["norm_gain"]["weight_decay"] == 0.0


# ----------------------------------------------------------------------------- build / set_lr
def test_build_adamw_foreach_on_cpu_fused_on_request() -> None:
    model, cfg = make(SMALL, betas=[0.8, 0.9])
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["foreach"] and not opt.defaults["fused"]
    assert opt.param_groups[0]["betas"] == (0.8, 0.9)
    model, cfg = make(SMALL, fused=True)
    opt = build_optimizer(model, cfg)
    assert opt.defaults["fused"]
    train(model, opt, batch(), 1)                      # CPU fused AdamW runs


def test_build_muon_and_set_lr() -> None:
    model, cfg = make(SMALL, name="muon", lr=1e-3, muon={"lr": 0.05, "momentum": 0.9, "ns_steps": 3})
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, Muon)
    g = next(g for g in opt.param_groups if g["use_muon"])
    assert (g["momentum"], g["ns_steps"], g["nesterov"]) == (0.9, 3, True)
    set_lr(opt, 0.5)
    assert {grp["name"]: grp["lr"] for grp in opt.param_groups} == {
        "embedding": 5e-4, "hidden_matrix/muon": 0.025, "norm_gain": 5e-4, "final_norm_gain": 5e-4}
    set_lr(opt, 1.0)
    assert all(grp["lr"] == grp["base_lr"] for grp in opt.param_groups)


def test_muon_requires_flag_and_2d() -> None:
    w = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="use_muon"):
        Muon([w])
    with pytest.raises(ValueError, match="2-D"):
        Muon([{"params": [torch.nn.Parameter(torch.randn(4))], "use_muon": True}])


# ----------------------------------------------------------------------------- Newton–Schulz
@pytest.mark.parametrize("shape", [(32, 96), (96, 32)])
def test_newton_schulz_orthogonalises(shape: tuple[int, int]) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = newton_schulz(g, steps=5)
    assert x.dtype == torch.float64 and x.shape == g.shape
    s = torch.linalg.svdvals(x)
    # Quintic NS is approximate: the iterated map a s + b s^3 + c s^5 keeps [0.68, 1.14] invariant.
    assert s.min() > 0.65 and s.max() < 1.2
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    cos = (x * polar).sum() / (x.norm() * polar.norm())
    assert cos > 0.9
    # The CPU default computes in float32 for float32 input; same answer to float32 accuracy.
    x32 = newton_schulz(g.float(), steps=5)
    assert x32.dtype == torch.float32
    torch.testing.assert_close(x32.double(), x, atol=1e-4, rtol=1e-4)


def test_muon_step_matches_formula() -> None:
    """Two steps on a tall matrix: EMA momentum, Nesterov blend, shape scale, decoupled decay."""
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(12, 4, generator=gen, dtype=torch.float64)
    grads = [torch.randn(12, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    lr, wd, beta, scale = 0.1, 0.2, 0.9, 3.0 ** 0.5      # scale = max(1, 12 / 4) ** 0.5
    for nesterov in (True, False):
        w = torch.nn.Parameter(w0.clone())
        opt = Muon([{"params": [w], "use_muon": True}], lr=lr, weight_decay=wd, momentum=beta,
                   nesterov=nesterov, ns_steps=5)
        ref, buf = w0.clone(), torch.zeros_like(w0)
        for g in grads:
            w.grad = g.clone()
            opt.step()
            buf = beta * buf + (1 - beta) * g
            m = (1 - beta) * g + beta * buf if nesterov else buf
            ref = ref * (1 - lr * wd) - lr * scale * newton_schulz(m, 5)
        torch.testing.assert_close(w.detach(), ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(w.grad, grads[-1])          # the gradient is not modified in place


# ----------------------------------------------------------------------------- AdamW path
def test_muon_adamw_path_matches_torch_adamw_float64() -> None:
    gen = torch.Generator().manual_seed(0)
    shapes = [(5, 3), (7,), ()]
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(6)]

    def groups(params: list[torch.nn.Parameter]) -> list[dict[str, Any]]:
        return [{"params": params[:2], "lr": 1e-2, "weight_decay": 0.1, "eps": 1e-8, "use_muon": False},
                {"params": params[2:], "lr": 3e-2, "weight_decay": 0.0, "eps": 1e-6, "use_muon": False}]

    ours = [torch.nn.Parameter(t.clone()) for t in init]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Muon(groups(ours), betas=(0.9, 0.95))
    ref_opt = torch.optim.AdamW(groups(ref), betas=(0.9, 0.95), foreach=False)
    for i, step_grads in enumerate(grads):
        for o in (opt, ref_opt):
            for grp in o.param_groups:
                grp["lr"] *= 0.9 if i else 1.0             # a changing lr, as under a schedule
        for p, q, g in zip(ours, ref, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=1e-13, atol=1e-15)
    for p, q in zip(ours, ref):
        for k in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][k], ref_opt.state[q][k], rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- training
def test_muon_decreases_loss() -> None:
    model, cfg = make(SMALL, name="muon", lr=3e-3)
    losses = train(model, build_optimizer(model, cfg), batch(), 20)
    assert losses[-1] < 0.5 * losses[0], losses
    # The Muon groups alone (AdamW groups' lr ~ 0) still train: the drop is not all AdamW's.
    model, cfg = make(SMALL, name="muon", lr=1e-12)
    losses = train(model, build_optimizer(model, cfg), batch(), 20)
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("api", ["torch", "dcp"])
@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_state_dict_resume_is_exact(name: str, api: str) -> None:
    """Save after 3 steps, run 3 more; a fresh model + optimizer loaded from the save must match.

    "dcp" goes through torch.distributed.checkpoint's get/set_state_dict, as train/checkpoint.py does.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    ids = batch()
    model, cfg = make(SMALL, name=name, lr=3e-3)
    opt = build_optimizer(model, cfg)
    train(model, opt, ids, 3)
    msd, osd = get_state_dict(model, opt) if api == "dcp" else (model.state_dict(), opt.state_dict())
    buf = io.BytesIO()
    torch.save({"model": msd, "optim": osd}, buf)
    train(model, opt, ids, 3)

    fresh, _ = make(SMALL)
    fresh_opt = build_optimizer(fresh, cfg)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    if api == "dcp":
        set_state_dict(fresh, fresh_opt, model_state_dict=ckpt["model"], optim_state_dict=ckpt["optim"])
    else:
        fresh.load_state_dict(ckpt["model"])
        fresh_opt.load_state_dict(ckpt["optim"])
    assert [g["name"] for g in fresh_opt.param_groups] == [g["name"] for g in opt.param_groups]
    train(fresh, fresh_opt, ids, 3)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    for (i, a), (j, b) in zip(opt.state_dict()["state"].items(), fresh_opt.state_dict()["state"].items()):
        assert i == j and a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), i
