"""configs/ablations/ffn: one arm per activation and GLU variant plus stoch_ft / swi_ft, each
differing from the SwiGLU baseline only in model.ffn keys and parameter-matched to it."""
from __future__ import annotations

import pytest
import torch
from ablate_testing import REPO

import models
from models.flops import count_params
from train.callbacks.activation_schedule import relu_switch_step
from train.config import flatten, load_config
from train.params import arms_report, params_report

FFN_DIR = REPO / "configs" / "ablations" / "ffn"
ARMS = sorted(p.stem for p in FFN_DIR.glob("*.yaml"))
EXPECTED = {"relu", "gelu", "gelu_tanh", "silu", "relu2", "polyrelu", "polynorm", "stochastic", "identity",
            "glu", "bilinear", "reglu", "geglu", "swiglu", "stoch_ft", "swi_ft"}


def non_embedding(arm: str) -> int:
    cfg = load_config(FFN_DIR / f"{arm}.yaml")
    cfg.model.vocab_size = cfg.resolved_vocab_size()
    with torch.device("meta"):
        return count_params(models.Decoder(cfg.model)).non_embedding


def test_every_arm_exists():
    assert EXPECTED <= set(ARMS)


@pytest.mark.parametrize("arm", ARMS)
def test_arm_differs_from_baseline_only_in_ffn_keys(arm):
    base = flatten(load_config(FFN_DIR / "swiglu.yaml").to_dict())
    cfg = load_config(FFN_DIR / f"{arm}.yaml")
    mine = flatten(cfg.to_dict())
    diff = {k for k in set(base) | set(mine) if base.get(k) != mine.get(k) and k != "name"}
    assert all(k.startswith("model.ffn.") for k in diff), diff
    if arm in EXPECTED - {"stoch_ft", "swi_ft"}:
        assert cfg.model.ffn.activation == arm


@pytest.mark.parametrize("arm", ARMS)
def test_arm_is_parameter_matched_to_swiglu(arm):
    """Within 0.1% (the paper's PolyCom bar); exact apart from PolyCom's 4 scalars per layer."""
    base, mine = non_embedding("swiglu"), non_embedding(arm)
    assert abs(mine - base) / base <= 1e-3, (arm, mine, base)
    cfg = load_config(FFN_DIR / f"{arm}.yaml")
    extra = 4 * cfg.model.n_layers if cfg.model.ffn.activation in ("polyrelu", "polynorm") else 0
    assert mine == base + extra


def test_finetune_arms():
    for arm, act in (("stoch_ft", "stochastic"), ("swi_ft", "swiglu")):
        cfg = load_config(FFN_DIR / f"{arm}.yaml")
        assert (cfg.model.ffn.kind, cfg.model.ffn.activation) == ("glu", act)
        alpha = cfg.model.ffn.relu_finetune_frac
        assert alpha > 0
        assert relu_switch_step(cfg.train.steps, alpha) == cfg.train.steps - round(alpha * cfg.train.steps)


def test_params_report_shows_the_ffn_arm():
    cfg = load_config(FFN_DIR / "polynorm.yaml")
    text = params_report(cfg)
    assert "ffn: mlp/polynorm  hidden 1536 (auto)" in text and "activation scalars 4" in text
    text = params_report(load_config(FFN_DIR / "stoch_ft.yaml"))
    assert "stochastic p=0.7 element eval=relu" in text and "ReLU fine-tune from step 1900 of 2000" in text
    table = arms_report([FFN_DIR / "swiglu.yaml", FFN_DIR / "relu.yaml", FFN_DIR / "polyrelu.yaml"])
    lines = table.splitlines()
    assert lines[1].startswith("swiglu") and "+0.000%" in lines[1] and lines[2].startswith("relu")
