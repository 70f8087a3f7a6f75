"""GLU variants ("GLU Variants Improve Transformer", arXiv 2002.05202), the fused linear FFN (arXiv 2501.03489), `hidden: auto` widths
and the `model.ffn` config errors. Float64 closed forms with fixed seeds."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.config import model_config
from models.ffn import GLU, GLU_GATES, MLP, FusedLinearFFN
from models.registry import ConfigError
from models.widths import glu_width, mlp_width, polycom_width

D = 24


def cfg_for(kind: str, act: str, d: int = D, **ffn):
    return model_config({"d_model": d, "n_layers": 1, "n_heads": 2, "vocab_size": 50,
                         "ffn": {"kind": kind, "activation": act, **ffn}})


def make_ffn(kind: str, act: str, seed: int = 0, **ffn):
    torch.manual_seed(seed)
    cfg = cfg_for(kind, act, **ffn)
    return models.ffn.build_ffn(cfg).double(), cfg


def rand_x(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


CLOSED_FORMS = {
    "glu": lambda a, b: torch.sigmoid(a) * b,
    "bilinear": lambda a, b: a * b,
    "reglu": lambda a, b: torch.clamp(a, min=0) * b,
    "geglu": lambda a, b: 0.5 * a * (1 + torch.erf(a / math.sqrt(2))) * b,     # exact erf GELU
    "swiglu": lambda a, b: a * torch.sigmoid(a) * b,                             # Swish, beta = 1
}


@pytest.mark.parametrize("variant", list(CLOSED_FORMS))
def test_glu_variant_closed_form(variant):
    ffn, _ = make_ffn("glu", variant)
    x = rand_x(2, 5, D)
    F_ = ffn.hidden
    W = ffn.w_in.weight[:F_].t()          # gate = the FIRST chunk of W_in
    V = ffn.w_in.weight[F_:].t()
    ref = CLOSED_FORMS[variant](x @ W, x @ V) @ ffn.w2.weight.t()
    torch.testing.assert_close(ffn(x), ref, rtol=1e-12, atol=1e-12)


def test_bilinear_is_reglu_on_nonnegative_gate_and_gate_is_first_chunk():
    bil, _ = make_ffn("glu", "bilinear")
    reg, _ = make_ffn("glu", "reglu")
    reg.load_state_dict(bil.state_dict())
    F_ = bil.hidden
    with torch.no_grad():                  # gate weights >= 0 and x >= 0 -> xW >= 0; up weights of both signs
        for m in (bil, reg):
            m.w_in.weight[:F_] = m.w_in.weight[:F_].abs()
    x = rand_x(3, 4, D).abs()
    torch.testing.assert_close(bil(x), reg(x), rtol=0, atol=0)
    # were the gate the second chunk, ReGLU would clip the negative up-projections and differ
    swapped = torch.clamp(x @ bil.w_in.weight[F_:].t(), min=0) * (x @ bil.w_in.weight[:F_].t())
    assert (swapped @ bil.w2.weight.t() - reg(x)).abs().max() > 1e-3


@pytest.mark.parametrize("variant", list(GLU_GATES))
def test_gradcheck_glu_variants(variant):
    ffn, _ = make_ffn("glu", variant)
    ffn.train()
    x = rand_x(2, 3, D).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ffn(x), (x,), eps=1e-6, atol=1e-7)


def test_gelu_exact_and_tanh_are_distinct_registered_choices():
    x = rand_x(64)
    exact = models.activations.build_activation("gelu", 1)(x)
    tanh = models.activations.build_activation("gelu_tanh", 1)(x)
    torch.testing.assert_close(exact, 0.5 * x * (1 + torch.erf(x / math.sqrt(2))), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(tanh, F.gelu(x, approximate="tanh"), rtol=0, atol=0)
    assert (exact - tanh).abs().max() > 1e-6


# ----------------------------------------------------------------------------- widths / parity
@pytest.mark.parametrize("d", [64, 96, 128, 192, 384, 1024])
def test_auto_widths(d):
    assert MLP.hidden_width(cfg_for("mlp", "gelu", d)) == mlp_width(d, 64) == 64 * math.ceil(4 * d / 64)
    assert GLU.hidden_width(cfg_for("glu", "swiglu", d)) == glu_width(d, 64) == 64 * math.ceil(8 * d / 3 / 64)
    poly = MLP.hidden_width(cfg_for("mlp", "polynorm", d))
    assert poly == polycom_width(d, 64) == 64 * math.ceil(1.5 * glu_width(d, 64) / 64)
    assert MLP.hidden_width(cfg_for("mlp", "stochastic", d)) == mlp_width(d, 64)
    assert MLP.hidden_width(cfg_for("mlp", "relu", d, hidden=100)) == 100          # explicit width wins


@pytest.mark.parametrize("d", [128, 192, 256, 384])
def test_glu_params_match_ungated_4d_up_to_rounding(d):
    """Reference test 2: 3 d F_glu vs 2 d 4d, equal up to rounding F to multiple_of."""
    glu = 3 * d * GLU.hidden_width(cfg_for("glu", "swiglu", d))
    mlp = 2 * d * MLP.hidden_width(cfg_for("mlp", "relu", d))
    assert abs(glu - mlp) <= 3 * d * 63
    if d % 24 == 0:
        assert glu == mlp


# ----------------------------------------------------------------------------- fused linear
def test_fused_linear_equals_identity_mlp_exactly():
    """Section 8c test 3: W2 (W1 x) == W_fused x, W_fused = W2 W1 (fp64)."""
    for bias in (False, True):
        mlp, cfg = make_ffn("mlp", "identity", bias=bias)
        if bias:
            with torch.no_grad():
                mlp.w1.bias.normal_()
                mlp.w2.bias.normal_()
        fcfg = cfg_for("fused_linear", "identity", bias=bias)
        fused = FusedLinearFFN.from_mlp(mlp, fcfg)
        x = rand_x(2, 7, D)
        torch.testing.assert_close(fused(x), mlp(x), rtol=1e-12, atol=1e-12)
        assert fused.w.weight.shape == (D, D)


def test_fused_linear_model_and_config():
    m = models.Decoder(cfg_for("fused_linear", "identity"))
    assert sum(p.numel() for p in m.blocks[0].ffn.parameters()) == D * D
    assert m.blocks[0].ffn.w.is_residual_out
    with pytest.raises(ConfigError) as e:
        cfg_for("fused_linear", "swiglu")
    assert e.value.key == "model.ffn.activation" and "identity" in str(e.value)
    with pytest.raises(ConfigError) as e:
        cfg_for("fused_linear", "identity", hidden=64)
    assert e.value.key == "model.ffn.hidden"


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("ffn, key, text", [
    ({"kind": "mlp", "activation": "swiglu"}, "model.ffn.activation", "GLU variant"),
    ({"kind": "glu", "activation": "relu"}, "model.ffn.activation", "unknown GLU variant"),
    ({"kind": "mlp", "activation": "polynrom"}, "model.ffn.activation", "polynorm"),
    ({"kind": "mlp", "activation": "gelu", "relu_finetune_frac": 0.1}, "model.ffn.relu_finetune_frac", "silu"),
    ({"kind": "glu", "activation": "geglu", "relu_finetune_frac": 0.1}, "model.ffn.relu_finetune_frac", "swiglu"),
    ({"kind": "glu", "activation": "swiglu", "relu_finetune_frac": 1.5}, "model.ffn.relu_finetune_frac", "[0, 1]"),
    ({"kind": "mlp", "activation": "stochastic", "stochastic": {"p": 1.2}}, "model.ffn.stochastic.p", "[0, 1]"),
    ({"kind": "mlp", "activation": "stochastic", "stochastic": {"granularity": "step"}},
     "model.ffn.stochastic.granularity", "element"),
    ({"kind": "mlp", "activation": "stochastic", "stochastic": {"eval_mode": "random"}},
     "model.ffn.stochastic.eval_mode", "relu"),
    ({"kind": "mlp", "activation": "stochastic", "stochastic": {"q": 0.1}}, "model.ffn.stochastic.q", "unknown key"),
])
def test_ffn_config_errors_name_the_key(ffn, key, text):
    with pytest.raises(ConfigError) as e:
        model_config({"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 50, "ffn": ffn})
    assert e.value.key == key
    assert text in str(e.value)


def test_stochastic_is_valid_in_both_mlp_and_glu():
    for kind in ("mlp", "glu"):
        m = models.Decoder(cfg_for(kind, "stochastic"))
        assert type(m.blocks[0].ffn.act).__name__ == "StochasticActivation"
    for kind, act in (("mlp", "silu"), ("mlp", "stochastic"), ("glu", "swiglu"), ("glu", "stochastic")):
        cfg_for(kind, act, relu_finetune_frac=0.05)     # the switchable ones validate
