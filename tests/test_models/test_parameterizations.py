"""SP, muP and CompleteP: the per-role table of "Don't be lazy: CompleteP enables compute-efficient
deep transformers" (arXiv 2505.01618, with its reference code's choices; see models/mup.py) for
width and depth multipliers in {1, 2, 4}^2, the identity at the base shape, the residual and
init rules per layer, coverage of every registered tag, the config errors, and a coordinate
check through the real train_step."""
from __future__ import annotations

import math

import pytest
import torch
from ablate_testing import make_cfg

import models
from models import registry
from models.mup import MuP
from models.parameterization import StandardParam
from models.registry import ConfigError
from models.tags import ROLES, TagSpec, registered_tags, tag_spec
from train.bench import random_batches
from train.coordcheck import coordcheck
from train.optim import param_groups

BASE_W, BASE_D, SIGMA, LR, WD, EPS = 32, 2, 0.02, 1e-2, 0.1, 1e-8

# The expected multipliers, written out from the paper's table (not from models/mup.py):
# (lr, wd, eps) per role as functions of (mN, mL, alpha).
EXPECTED = {
    "mup": {
        "embedding": lambda n, l, a: (1, 0, 1), "hidden_weight": lambda n, l, a: (1 / n, 1, 1),
        "hidden_bias": lambda n, l, a: (1, 0, 1), "hidden_norm": lambda n, l, a: (1, 0, 1),
        "final_norm": lambda n, l, a: (1, 0, 1), "readout": lambda n, l, a: (1, 0, 1),
        "table": lambda n, l, a: (1, 1, 1)},
    "completep": {
        "embedding": lambda n, l, a: (1, 0, 1 / (n * l ** a)),
        "hidden_weight": lambda n, l, a: (l ** (a - 1) / n, n, 1 / (n * l ** a)),
        "hidden_bias": lambda n, l, a: (l ** (a - 1), 0, 1 / (n * l ** a)),
        "hidden_norm": lambda n, l, a: (l ** (a - 1), 0, 1 / (n * l ** a)),
        "final_norm": lambda n, l, a: (1, 0, 1 / (n * l ** a)),
        "readout": lambda n, l, a: (1, 0, 1 / (n * l ** a)),
        "table": lambda n, l, a: (l ** (a - 1), 1, 1 / (n * l ** a))},
}


def _cfg(kind: str, mn: int = 1, ml: int = 1, **param):
    model = {"d_model": BASE_W * mn, "n_layers": BASE_D * ml, "n_heads": 2, "vocab_size": 320, "max_seq_len": 32,
             "tie_embeddings": False, "qk_norm": True, "ffn": {"bias": True},
             "param": {"kind": kind, "base_width": BASE_W, "base_depth": BASE_D, **param}}
    return make_cfg({"device": "cpu", "model": model, "tokenizer": {"vocab_size": 320}, "data": {"seq_len": 32},
                     "optim": {"name": "adamw", "lr": LR, "weight_decay": WD, "eps": EPS}})


@pytest.mark.parametrize("kind, alpha", [("mup", None), ("completep", None), ("completep", 0.5)])
@pytest.mark.parametrize("mn", [1, 2, 4])
@pytest.mark.parametrize("ml", [1, 2, 4])
def test_table_conformance(kind, alpha, mn, ml):
    cfg = _cfg(kind, mn, ml, **({"alpha": alpha} if alpha is not None else {}))
    with torch.device("meta"):
        model = models.Decoder(cfg.model)
    a = 1.0 if alpha is None else alpha
    a_eff = a if kind == "completep" else 0.0
    roles_seen = set()
    for g in param_groups(model, cfg):
        spec = tag_spec(g["tag"])
        roles_seen.add(spec.role)
        lr, wd, eps = EXPECTED[kind][spec.role](mn, ml, a)
        assert g["lr"] == pytest.approx(LR * lr, rel=1e-12), g["name"]
        assert g["weight_decay"] == pytest.approx(WD * wd, rel=1e-12), g["name"]
        assert g["eps"] == pytest.approx(EPS * eps, rel=1e-12), g["name"]
        std = model.param.init_std(spec)
        assert std == pytest.approx(SIGMA / math.sqrt(mn) if spec.role == "hidden_weight" else SIGMA, rel=1e-12)
    assert roles_seen == {"embedding", "hidden_weight", "hidden_bias", "hidden_norm", "final_norm", "readout"}
    assert all(b.residual_multiplier == pytest.approx(ml ** -a_eff, rel=1e-12) for b in model.blocks)
    assert model.param.output_multiplier == pytest.approx(1 / mn, rel=1e-12)
    d_h, base_d_h = BASE_W * mn // 2, BASE_W // 2
    scale = model.blocks[0].mixer.scale
    assert (scale is None) if mn == 1 else scale == pytest.approx(math.sqrt(base_d_h) / d_h, rel=1e-12)


def test_eps_scope_hidden_scales_block_groups_only():
    cfg = _cfg("completep", 2, 2, eps_scope="hidden")
    with torch.device("meta"):
        model = models.Decoder(cfg.model)
    for g in param_groups(model, cfg):
        in_block = tag_spec(g["tag"]).in_block
        assert g["eps"] == pytest.approx(EPS / (2 * 2) if in_block else EPS, rel=1e-12), g["name"]


@pytest.mark.parametrize("kind", ["mup", "completep"])
def test_identity_at_the_base_shape(kind):
    """Width and depth at the base, multipliers 1: the model, its forward, its optimizer groups
    and two optimizer steps are bit-identical to SP."""
    runs = {}
    for k in ("sp", kind):
        cfg = _cfg(k)
        model = models.Decoder(cfg.model, init_seed=1)
        groups = param_groups(model, cfg)
        opt = torch.optim.AdamW(groups, lr=LR, eps=EPS, weight_decay=WD)
        x = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
        logits0 = model(x).logits.detach().clone()
        for _ in range(2):
            model(x, labels=x).losses["ce"].value.backward()
            opt.step()
            opt.zero_grad()
        runs[k] = (logits0, {n: p.detach().clone() for n, p in model.named_parameters()},
                   [(g["name"], g["lr"], g["weight_decay"], g["eps"]) for g in groups])
    (l0, p0, g0), (l1, p1, g1) = runs["sp"], runs[kind]
    assert g0 == g1
    assert torch.equal(l0, l1)
    assert all(torch.equal(p0[n], p1[n]) for n in p0)


def test_init_std_and_branch_multiplier_per_layer():
    cfg = _cfg("completep", 4, 2)                      # d = 128, L = 4
    model = models.Decoder(cfg.model)
    for block in model.blocks:
        assert block.residual_multiplier == pytest.approx(0.5)
        w = block.mixer.wq.weight.detach()
        assert abs(float(w.std()) - SIGMA / 2) < 0.1 * SIGMA / 2          # sigma / sqrt(mN), no depth factor
        assert abs(float(block.ffn.w2.weight.detach().std()) - SIGMA / 2) < 0.1 * SIGMA / 2
    assert abs(float(model.embed.weight.detach().std()) - SIGMA) < 0.05 * SIGMA


def test_every_registered_tag_has_a_rule_under_every_kind():
    for name in registered_tags():
        spec = tag_spec(name)
        assert spec.role in ROLES, f"tag {name!r} has no parameterization role: give its TagSpec a role"
        for kind in registry.PARAMETERIZATIONS.names():
            param = registry.PARAMETERIZATIONS.get(kind)(_cfg(kind, 2, 2).model)
            rule = param.group_rule(spec)
            assert rule.lr_mult > 0 and rule.eps_mult > 0, (kind, name)
    orphan = TagSpec("test_orphan", matrix=False, in_block=True, matmul=False, muon_ok=False)
    for cls in (StandardParam, MuP):
        with pytest.raises(KeyError, match="no role"):
            cls(_cfg("sp").model).group_rule(orphan)


def test_config_errors_name_the_key():
    cases = [
        ({"model__param__kind": "mup", "model__param__alpha": 0.5}, "model.param.alpha"),
        ({"model__param__alpha": 1.0}, "model.param.alpha"),
        ({"model__param__output_mult": 2.0}, "model.param.output_mult"),
        ({"model__param__kind": "mup", "model__param__eps_scope": "hidden"}, "model.param.eps_scope"),
        ({"model__param__kind": "mup", "model__residual_init_scaling": True}, "model.residual_init_scaling"),
        ({"model__param__kind": "completep", "optim__name": "muon"}, "optim.name"),
    ]
    base = {"device": "cpu", "model": {"d_model": 32, "n_layers": 2, "n_heads": 2}}
    for over, key in cases:
        with pytest.raises(ConfigError) as e:
            make_cfg(base, **over)
        assert e.value.key == key, over


def test_coordinate_check_sp_grows_mup_flat():
    """After 10 AdamW steps at lr 1e-2 over widths 32..256, the changes of the output logits and
    of the last block's output grow with width under SP and stay flat under muP."""
    torch.set_num_threads(1)
    base = {"device": "cpu", "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 320,
                                       "max_seq_len": 32, "param": {"base_width": 32}},
            "tokenizer": {"vocab_size": 320}, "data": {"seq_len": 32},
            "train": {"global_batch": 8, "micro_batch": 8, "progress": False},
            "optim": {"name": "adamw", "lr": 1e-2, "schedule": {"kind": "constant", "warmup": 0}}}
    for seed in (0, 1, 2):
        for kind in ("sp", "mup"):
            cfg = make_cfg(base, model__param__kind=kind, seed=seed)
            result = coordcheck(cfg, [32, 64, 128, 256], [], steps=10, batches=lambda c: random_batches(c, 1, seed))
            slopes = result["sweeps"]["width"]["slopes"]
            for q in ("logits_delta", "residual_delta"):
                if kind == "sp":
                    assert slopes[q] > 0.5, (seed, kind, q, slopes[q])
                else:
                    assert abs(slopes[q]) < 0.2, (seed, kind, q, slopes[q])
