"""Norms and LN-free stabilizers: DyT against its formula (float64, gradcheck), attention entropy
and its regulariser against explicit loops, the per-head temperature, Q/K biases and the scaled
FFN, the entropy probe rows, and every option training 20 steps with finite values."""
from __future__ import annotations

import math

import pytest
import torch

import models
from models.config import model_config
from models.context import MixerContext
from models.dyt import DyT
from models.entropy import attention_probs, causal_max_entropy, entropy_penalty, row_entropy
from models.mixers.attention import Attention
from models.rope import RotaryEmbedding

BASE = {"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "max_seq_len": 32}


def test_dyt_equals_its_formula_and_passes_gradcheck():
    torch.manual_seed(0)
    m = DyT(5).double()
    with torch.no_grad():
        m.alpha.fill_(0.7)
        m.weight.copy_(torch.randn(5))
        m.bias.copy_(torch.randn(5))
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    expected = m.weight * torch.tanh(0.7 * x) + m.bias
    torch.testing.assert_close(m(x), expected, rtol=1e-15, atol=1e-15)
    assert torch.autograd.gradcheck(lambda x, a, g, b: g * torch.tanh(a * x) + b,
                                    (x, m.alpha.detach().clone().requires_grad_(), m.weight.detach().clone()
                                     .requires_grad_(), m.bias.detach().clone().requires_grad_()))
    assert torch.autograd.gradcheck(lambda x: m(x), (x,))
    m.reset_parameters()
    assert float(m.alpha.detach()) == 0.5 and bool((m.weight == 1).all()) and bool((m.bias == 0).all())


def test_entropy_of_uniform_and_one_hot_rows():
    T, D = 6, 4
    q = torch.zeros(1, 1, T, D, dtype=torch.float64)          # zero scores: uniform over the visible keys
    k = torch.randn(1, 1, T, D, dtype=torch.float64)
    e = row_entropy(attention_probs(q, k, None, None))[0, 0]
    torch.testing.assert_close(e, causal_max_entropy(T, T, q.device), rtol=1e-12, atol=1e-12)   # log(t+1)
    assert math.isclose(float(e[-1]), math.log(T), rel_tol=1e-12)
    one_hot = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    assert float(row_entropy(one_hot)) == 0.0


def _attention(cfg_extra: dict, mixer: dict | None = None) -> tuple[Attention, MixerContext, torch.Tensor]:
    cfg = model_config({**BASE, **cfg_extra, "layers": {"mixers": {"A": {"kind": "attention", **(mixer or {})}}}})
    torch.manual_seed(1)
    attn = Attention(cfg, cfg.layers.mixers["A"], 0).double()
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    cos, sin = RotaryEmbedding(cfg.head_dim, 8, cfg.rope_theta)(0, 8, torch.device("cpu"))
    ctx = MixerContext(start=0, cos=cos, sin=sin)
    x = torch.randn(2, 8, cfg.d_model, dtype=torch.float64)
    return attn, ctx, x


@torch.no_grad()
def _explicit_penalty(attn: Attention, ctx: MixerContext, x: torch.Tensor, margin: float,
                      window: int | None = None) -> float:
    """The regulariser by loops: entropy of each causal row of softmax(q k^T / sqrt(dh)) (over the
    last `window` keys), then delta^2 outside the margin, averaged over batch, head and position."""
    from models.rope import apply_rope
    B, T, _ = x.shape
    H, dh = attn.n_heads, attn.head_dim
    q = apply_rope(attn.wq(x).view(B, T, H, dh), ctx.cos, ctx.sin)
    k = apply_rope(attn.wk(x).view(B, T, H, dh), ctx.cos, ctx.sin)
    theta = torch.sigmoid(attn.ereg_theta)
    e_max, total = math.log(min(T, window or T)), 0.0
    for b in range(B):
        for h in range(H):
            for i in range(T):
                first = 0 if window is None else max(0, i - window + 1)
                s = torch.stack([q[b, i, h] @ k[b, j, h] / math.sqrt(dh) for j in range(first, i + 1)])
                p = torch.softmax(s, 0)
                ent = float(-(p * p.log()).sum())
                delta = ent - float(theta[h]) * e_max
                total += delta ** 2 if abs(delta) > margin * e_max else 0.0
    return total / (B * H * T)


def test_entropy_regulariser_matches_loops_and_reaches_logits_and_thresholds():
    attn, ctx, x = _attention({"entropy_reg": {"weight": 0.5, "margin": 0.05}})
    attn.train()
    y, aux = attn(x, ctx)
    term = aux.losses["entropy_reg"]
    assert term.reduction == "mean" and attn.ereg_layers == 2
    expected = 0.5 * _explicit_penalty(attn, ctx, x, 0.05) / 2
    assert expected > 0
    assert math.isclose(float(term.value.detach()), expected, rel_tol=1e-10)
    term.value.backward()
    assert attn.wq.weight.grad.abs().sum() > 0 and attn.ereg_theta.grad.abs().sum() > 0
    # SDPA's output is the same as without the side path
    attn.eval()
    torch.testing.assert_close(attn(x, ctx), y.detach(), rtol=1e-12, atol=1e-12)


def test_a_windowed_layer_has_its_own_maximum_entropy():
    """A window-3 layer's rows see at most 3 keys: uniform rows are at the probe's maximum
    (log min(t+1, 3), not log(t+1)), and the regulariser's E_max is log 3."""
    attn, ctx, x = _attention({"entropy_reg": {"weight": 0.5, "margin": 0.05}}, {"window": 3})
    attn.train()
    _, aux = attn(x, ctx)
    expected = 0.5 * _explicit_penalty(attn, ctx, x, 0.05, window=3) / 2
    assert expected > 0 and math.isclose(float(aux.losses["entropy_reg"].value.detach()), expected, rel_tol=1e-10)
    with torch.no_grad():
        attn.wq.weight.zero_()                                   # zero scores: uniform rows
    attn.eval()
    _, aux = attn(x, MixerContext(start=0, cos=ctx.cos, sin=ctx.sin, want_stats=True))
    uniform = sum(math.log(min(t + 1, 3)) for t in range(8)) / 8
    assert math.isclose(float(aux.stats["attn_entropy_max"]), uniform, rel_tol=1e-12)
    torch.testing.assert_close(aux.stats["attn_entropy"], torch.full((attn.n_heads,), uniform, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)


def test_no_penalty_and_no_threshold_gradient_inside_the_margin():
    attn, ctx, x = _attention({"entropy_reg": {"weight": 0.5, "margin": 0.99}})
    attn.train()
    _, aux = attn(x, ctx)
    aux.losses["entropy_reg"].value.backward()
    assert float(aux.losses["entropy_reg"].value.detach()) == 0.0
    assert float(attn.ereg_theta.grad.abs().sum()) == 0.0


def test_penalty_formula_by_hand():
    entropy = torch.tensor([[[0.1, 1.0], [0.5, 0.6]]], dtype=torch.float64)   # (B=1, H=2, T=2)
    theta = torch.tensor([0.5, 0.25], dtype=torch.float64)
    e_max = math.log(4)
    deltas = [0.1 - 0.5 * e_max, 1.0 - 0.5 * e_max, 0.5 - 0.25 * e_max, 0.6 - 0.25 * e_max]
    expected = sum(d * d for d in deltas if abs(d) > 0.1 * e_max) / 4
    assert math.isclose(float(entropy_penalty(entropy, theta, 0.1, 4)), expected, rel_tol=1e-12)


def test_entropy_loss_counted_once_under_activation_checkpointing():
    from train.parallel import apply_activation_checkpointing
    cfg = model_config({**BASE, "entropy_reg": {"weight": 1.0, "margin": 0.0}})
    x = torch.randint(0, 64, (2, 12))
    results = []
    for ac in (False, True):
        m = models.Decoder(cfg, init_seed=0)
        m.init_weights()
        if ac:
            apply_activation_checkpointing(m)
        out = m(x, labels=x)
        loss = out.losses["ce"].value + out.losses["entropy_reg"].value
        loss.backward()
        grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in m.named_parameters()}
        results.append((float(out.losses["entropy_reg"].value.detach()), grads))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for name, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], g, rtol=1e-5, atol=1e-7)


def test_temperature_starts_at_one_and_learns():
    plain, ctx, x = _attention({})
    warm, _, _ = _attention({}, {"temperature": True})
    with torch.no_grad():
        for name, p in plain.named_parameters():
            warm.get_parameter(name).copy_(p)
        warm.log_tau.zero_()
    torch.testing.assert_close(warm(x, ctx), plain(x, ctx), rtol=1e-12, atol=1e-12)     # tau = 1 at init
    warm(x, ctx).pow(2).sum().backward()
    assert warm.log_tau.grad.abs().sum() > 0
    with torch.no_grad():
        warm.log_tau.fill_(1.0)
    assert not torch.allclose(warm(x, ctx), plain(x, ctx))


def test_qk_bias_and_scaled_ffn_parameters_get_gradients():
    cfg = model_config({**BASE, "layers": {"mixers": {"A": {"kind": "attention", "qk_bias": True}}},
                        "ffn": {"kind": "fused_linear", "activation": "identity", "output_scale": True}})
    m = models.Decoder(cfg, init_seed=0)
    m.init_weights()
    assert float(m.blocks[0].ffn.output_scale.detach()) == 1.0
    x = torch.randint(0, 64, (2, 12))
    m(x, labels=x).losses["ce"].value.backward()
    for p in (m.blocks[0].mixer.wq.bias, m.blocks[0].mixer.wk.bias, m.blocks[0].ffn.output_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert m.blocks[0].mixer.wv.bias is None                 # only Q and K get biases


def test_entropy_probe_rows_per_layer_and_head():
    from eval.probes.entropy import entropy_rows, entropy_series
    cfg = model_config(BASE)
    m = models.Decoder(cfg, init_seed=0)
    m.init_weights()
    batch = {"input_ids": torch.randint(0, 64, (2, 10)), "indices": torch.arange(2)}
    rows = entropy_rows(m, [batch], step=7)
    assert [(r["layer"], r["head"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(r["probe"] == "entropy" and r["step"] == 7 and 0 < r["value"] <= r["max"] + 1e-6 for r in rows)
    assert rows[0]["max"] == pytest.approx(float(causal_max_entropy(10, 10, torch.device("cpu")).mean()))
    series = entropy_series(m, [batch], "cpu")
    assert series["entropy"][0] == pytest.approx((rows[0]["value"] + rows[1]["value"]) / 2)
    assert m.training                                        # the probe leaves the mode as it found it


OPTIONS = {
    "dyt": {"norm": {"block": "dyt", "final": "dyt"}},
    "layernorm": {"norm": {"block": "layernorm", "final": "layernorm"}},
    "ln_free_relu": {"norm": {"block": "none", "final": "rmsnorm"}, "ffn": {"kind": "mlp", "activation": "relu"},
                     "layers": {"mixers": {"A": {"kind": "attention", "qk_bias": True}}}},
    "ln_free_ereg": {"norm": {"block": "none", "final": "none"},
                     "ffn": {"kind": "fused_linear", "activation": "identity", "output_scale": True},
                     "layers": {"mixers": {"A": {"kind": "attention", "qk_bias": True, "temperature": True}}},
                     "entropy_reg": {"weight": 0.01}},
    "weight_norm": {"norm": {"block": "none"}, "ffn": {"weight_norm": "weight"}},
    "spectral_norm": {"norm": {"block": "none"}, "ffn": {"weight_norm": "spectral"}},
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_every_norm_and_stabilizer_option_trains(name, tmp_path):
    from ablate_testing import TINY, make_cfg
    from train.bench import random_batches
    from train.trainer import Trainer
    model = {**TINY["model"], **OPTIONS[name]}
    cfg = make_cfg({**TINY, "model": model, "train": {**TINY["train"], "steps": 20}}, model__vocab_size=384)
    t = Trainer(cfg)
    t.build()
    batches = random_batches(cfg, 1, seed=0)
    losses = [t.train_step(batches)["loss_total"] for _ in range(20)]
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]


def test_weight_norm_starts_at_the_plain_init_and_normalises_rows():
    plain = models.Decoder(model_config(BASE), init_seed=3)
    wn = models.Decoder(model_config({**BASE, "ffn": {"weight_norm": "weight"}}), init_seed=3)
    w = wn.blocks[0].ffn.w2
    torch.testing.assert_close(w.normalized_weight(), plain.blocks[0].ffn.w2.weight, rtol=1e-6, atol=1e-7)
    x = torch.randint(0, 64, (2, 10))
    torch.testing.assert_close(wn(x).logits, plain(x).logits, rtol=1e-5, atol=1e-6)   # same function at init
    with torch.no_grad():
        w.weight.mul_(3.0)                           # v's scale does not matter, only g and the direction
    torch.testing.assert_close(wn(x).logits, plain(x).logits, rtol=1e-5, atol=1e-6)
    wn(x, labels=x).losses["ce"].value.backward()
    assert w.gain.grad.abs().sum() > 0


def test_spectral_norm_converges_to_unit_largest_singular_value():
    from models.weight_norm import SpectralNormLinear
    torch.manual_seed(0)
    layer = SpectralNormLinear(12, 8).double()
    for _ in range(100):
        layer.power_iteration()
    top = torch.linalg.matrix_norm((layer.weight / layer.sigma).detach(), ord=2)
    assert abs(float(top) - 1.0) < 1e-3
    assert math.isclose(float(layer.sigma), float(torch.linalg.matrix_norm(layer.weight.detach(), ord=2)), rel_tol=1e-6)


def test_spectral_norm_iterates_in_a_callback_and_is_checkpointed(tmp_path):
    """The callback updates sigma before each step's forward; sigma and u are in the state dict;
    the forward under activation checkpointing sees the same W / sigma (same loss and grads)."""
    from ablate_testing import TINY, make_cfg
    from train.bench import random_batches
    from train.callbacks import default_callbacks
    from train.trainer import Trainer
    results = []
    for ac in ("none", "full"):
        cfg = make_cfg({**TINY, "model": {**TINY["model"], "ffn": {"weight_norm": "spectral"}}},
                       model__vocab_size=384, parallel__activation_checkpointing=ac)
        t = Trainer(cfg, callbacks=default_callbacks(cfg))
        state = t.build()
        batches = random_batches(cfg, 1, seed=0)
        losses = []
        for _ in range(3):
            for cb in t.callbacks:
                cb.on_step_start(state)
            losses.append(t.train_step(batches)["loss"])
        results.append(losses)
        layer = next(m for m in state.model.modules() if type(m).__name__ == "SpectralNormLinear")
        assert float(layer.sigma) != 1.0                                  # the iteration ran
        assert any(k.endswith("w2.sigma") for k in state.model.state_dict())   # saved with the model
    assert results[0] == pytest.approx(results[1], rel=1e-6)
