"""PolyCom (arXiv 2411.03884): PolyReLU / PolyNorm formulas, init, gradients, fp32 numerics
under bf16 autocast, tags, and parameter parity with SwiGLU (F_poly = 1.5 F_swiglu).

Numeric checks in float64 with fixed seeds.
"""
from __future__ import annotations

import pytest
import torch

import models
from models.activations import PolyNorm, PolyReLU, build_activation
from models.activations.polycom import EPS, _PolyNormFn, _PolyReLUFn
from models.config import model_config
from models.ffn import GLU, MLP
from models.flops import count_params
from models.parameterization import StandardParam
from models.tags import param_tags, tag_spec
from models.widths import glu_width, polycom_width


def rand_u(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def with_params(mod, w, b):
    mod = mod.double()
    with torch.no_grad():
        mod.weight.copy_(torch.tensor(w, dtype=torch.float64))
        mod.bias.copy_(torch.tensor([b], dtype=torch.float64))
    return mod


def N(z, eps=EPS):
    return z / torch.sqrt((z * z).mean(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------- formulas
def test_polyrelu_closed_form():
    u = rand_u(3, 5, 16)
    w, b = [0.7, -0.4, 1.3], 0.25
    act = with_params(PolyReLU(), w, b)
    r = torch.clamp(u, min=0)
    ref = w[0] * r ** 3 + w[1] * r ** 2 + w[2] * r + b
    torch.testing.assert_close(act(u), ref, rtol=1e-14, atol=1e-14)


def test_polynorm_closed_form_per_token_over_hidden():
    u = rand_u(3, 5, 16)
    w, b = [0.7, -0.4, 1.3], 0.25
    act = with_params(PolyNorm(), w, b)
    ref = w[0] * N(u ** 3) + w[1] * N(u ** 2) + w[2] * N(u) + b
    torch.testing.assert_close(act(u), ref, rtol=1e-13, atol=1e-13)
    # the normalisation is per token over F: a token's output ignores the other tokens ...
    v = u.clone()
    v[0, 0] *= 5.0
    out_u, out_v = act(u), act(v)
    torch.testing.assert_close(out_u[:, 1:], out_v[:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(out_u[1:], out_v[1:], rtol=0, atol=0)
    # ... and is (up to eps) invariant to rescaling that token's pre-activations
    torch.testing.assert_close(out_v[0, 0], out_u[0, 0], rtol=0, atol=1e-5)   # eps effect ~ eps / mean(z^2)


def test_polynorm_unit_rms_up_to_eps():
    z = rand_u(4, 7, 32) * 0.01          # small z: the eps effect is visible
    m = (z * z).mean(-1)
    torch.testing.assert_close((N(z) ** 2).mean(-1), m / (m + EPS), rtol=1e-13, atol=0)
    # through the module: with w = (0, 0, 1), b = 0 the output is N(u) itself
    act = with_params(PolyNorm(), [0.0, 0.0, 1.0], 0.0)
    torch.testing.assert_close((act(z) ** 2).mean(-1), m / (m + EPS), rtol=1e-13, atol=0)


# ----------------------------------------------------------------------------- init
def test_init_values_and_equivalence():
    for cls in (PolyReLU, PolyNorm):
        act = cls()
        assert torch.equal(act.weight, torch.full((3,), 1 / 3))
        assert torch.equal(act.bias, torch.zeros(1))
    u = rand_u(2, 3, 8)
    r = torch.clamp(u, min=0)
    relu_act, norm_act = PolyReLU().double(), PolyNorm().double()
    for act in (relu_act, norm_act):
        act.reset_parameters()                      # 1/3 in float64 (the fp32 1/3 is not exact)
    torch.testing.assert_close(relu_act(u), (r ** 3 + r ** 2 + r) / 3, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(norm_act(u), (N(u ** 3) + N(u ** 2) + N(u)) / 3, rtol=1e-13, atol=1e-14)


def test_decoder_init_keeps_polycom_init():
    """Decoder.reset_parameters must leave w = 1/3, b = 0 (not the matrix normal init or zeros)."""
    for act_name in ("polyrelu", "polynorm"):
        m = models.Decoder(model_config({"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 50,
                                         "ffn": {"kind": "mlp", "activation": act_name}}))
        for block in m.blocks:
            assert torch.equal(block.ffn.act.weight.detach(), torch.full((3,), 1 / 3))
            assert torch.equal(block.ffn.act.bias.detach(), torch.zeros(1))


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_gradcheck_input_and_scalars(cls):
    act = with_params(cls(), [0.6, -0.3, 0.9], 0.1)
    u = rand_u(2, 3, 6, seed=3).requires_grad_(True)
    w = act.weight.detach().clone().requires_grad_(True)
    b = act.bias.detach().clone().requires_grad_(True)
    fn = (lambda u, w, b: _PolyReLUFn.apply(u, w, b)) if cls is PolyReLU \
        else (lambda u, w, b: _PolyNormFn.apply(u, w, b, EPS))
    assert torch.autograd.gradcheck(fn, (u, w, b), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_custom_backward_matches_plain_autograd(cls):
    """The memory-saving Function equals autograd through the closed form."""
    w0, b0 = [0.6, -0.3, 0.9], 0.1
    act = with_params(cls(), w0, b0)
    u = rand_u(2, 4, 12, seed=5).requires_grad_(True)
    g = rand_u(2, 4, 12, seed=6)
    (act(u) * g).sum().backward()
    u2 = u.detach().clone().requires_grad_(True)
    w = torch.tensor(w0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor([b0], dtype=torch.float64, requires_grad=True)
    if cls is PolyReLU:
        r = torch.clamp(u2, min=0)
        ref = w[0] * r ** 3 + w[1] * r ** 2 + w[2] * r + b
    else:
        ref = w[0] * N(u2 ** 3) + w[1] * N(u2 ** 2) + w[2] * N(u2) + b
    (ref * g).sum().backward()
    torch.testing.assert_close(u.grad, u2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.weight.grad, w.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(act.bias.grad, b.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- bf16
@pytest.mark.parametrize("cls", [PolyReLU, PolyNorm])
def test_powers_and_rms_in_fp32_under_bf16(cls):
    act = cls()                                        # fp32 parameters, as in mixed precision
    u32 = rand_u(2, 3, 64, seed=2).float() * 3
    u = u32.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = act(u)
    assert y.dtype == torch.bfloat16
    ref = act(u.detach().float()).to(torch.bfloat16)  # the same math in fp32, rounded once at the end
    assert torch.equal(y, ref)
    y.float().sum().backward()
    assert act.weight.grad.dtype == torch.float32 and torch.isfinite(act.weight.grad).all()
    assert u.grad.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- tags / widths / parity
def test_coefficients_are_scalars_without_weight_decay():
    m = models.Decoder(model_config({"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 50,
                                     "ffn": {"kind": "mlp", "activation": "polynorm"}}))
    tags = param_tags(m)
    assert tags["blocks.0.ffn.act.weight"] == "scalar" and tags["blocks.1.ffn.act.bias"] == "scalar"
    assert StandardParam(m.cfg).group_rule(tag_spec("scalar")).wd_mult == 0.0
    assert sum(p.numel() for n, p in m.named_parameters() if ".act." in n) == 4 * 2   # 4 per layer


def test_paper_width_rule():
    # BryceZhuo/PolyCom: the 1.3B SwiGLU intermediate 5504 becomes 8256 for non-gated activations
    assert glu_width(2048, 64) == 5504
    assert polycom_width(2048, 64) == 8256
    cfg = model_config({"d_model": 2048, "n_layers": 1, "n_heads": 16, "vocab_size": 64,
                        "ffn": {"kind": "mlp", "activation": "polyrelu"}})
    assert MLP.hidden_width(cfg) == 8256
    for d in (64, 128, 192, 384, 1000):
        assert polycom_width(d, 64) % 64 == 0 and polycom_width(d, 64) >= 1.5 * glu_width(d, 64)


@pytest.mark.parametrize("d_model", [128, 192, 384, 2048])
@pytest.mark.parametrize("act_name", ["polyrelu", "polynorm"])
def test_parameter_parity_with_swiglu(d_model, act_name):
    """Reference test 3: a dense model with F_poly = 1.5 F_swiglu matches SwiGLU within 0.1%."""
    base = {"d_model": d_model, "n_layers": 4, "n_heads": 4, "vocab_size": 512}
    with torch.device("meta"):
        swiglu = models.Decoder(model_config(dict(base, ffn={"kind": "glu", "activation": "swiglu"})))
        poly = models.Decoder(model_config(dict(base, ffn={"kind": "mlp", "activation": act_name})))
    assert poly.blocks[0].ffn.hidden == 3 * GLU.hidden_width(swiglu.cfg) // 2     # a multiple of 64 here
    a, b = count_params(swiglu).non_embedding, count_params(poly).non_embedding
    assert abs(b - a) / a <= 1e-3, (a, b)


def test_build_activation_keeps_old_signature():
    assert isinstance(build_activation("polyrelu", 16), PolyReLU)
    assert isinstance(build_activation("relu", 16), torch.nn.ReLU)
