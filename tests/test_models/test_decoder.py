"""Decoder behaviour: shapes, parameter counts, causality, GQA, sliding windows, tying,
KV-cache decoding, document masking, init, RMSNorm and RoPE.

Numeric checks run in float64 with fixed seeds so tolerances can be tight.
"""
from __future__ import annotations

import math

import pytest
import torch

import models
from models.config import model_config
from models.context import MixerContext
from models.norms import LayerNorm, RMSNorm
from models.rope import RotaryEmbedding, apply_rope

V = 97


def make_cfg(**over):
    data = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": V, "max_seq_len": 64}
    data.update(over)
    return model_config(data)


def make_model(seed: int = 0, **over) -> models.Decoder:
    torch.manual_seed(seed)
    return models.Decoder(make_cfg(**over)).double().eval()


def window_layers(window: int, pattern: str = "S") -> dict:
    return {"pattern": pattern, "mixers": {"A": {"kind": "attention"}, "S": {"kind": "attention", "window": window}}}


def ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (B, T), generator=g)


def expected_params(d, L, H, Hkv, vocab, tied, qk_norm):
    dh = d // H
    F = 64 * math.ceil(8 * d / 3 / 64)
    attn = d * (H * dh) + 2 * d * (Hkv * dh) + (H * dh) * d
    ffn = d * 2 * F + F * d
    norms = 2 * d + (2 * dh if qk_norm else 0)
    return vocab * d + L * (attn + ffn + norms) + d + (0 if tied else vocab * d)


def n_params(m) -> int:
    return sum(p.numel() for p in m.parameters())


# ----------------------------------------------------------------------------- shapes / counts
def test_logits_shape_and_dtype():
    m = make_model()
    x = ids(3, 11)
    _out = m(x)
    logits, cache = _out.logits, _out.cache
    assert logits.shape == (3, 11, V)
    assert logits.dtype == torch.float64
    assert cache is None
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("d_model", [64, 96])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n_kv_heads", [None, 2, 1])
def test_parameter_count_formula(d_model, tied, qk_norm, n_kv_heads):
    cfg = make_cfg(d_model=d_model, n_layers=3, n_heads=4, n_kv_heads=n_kv_heads,
                   tie_embeddings=tied, qk_norm=qk_norm)
    m = models.Decoder(cfg)
    Hkv = n_kv_heads or 4
    assert n_params(m) == expected_params(d_model, 3, 4, Hkv, V, tied, qk_norm)


def test_swiglu_hidden_width_auto():
    # F = 64 * ceil(8d/3/64): d=64 -> 192 (170.7 rounded up), d=96 -> 256 (exact multiple)
    for d, F in [(64, 192), (96, 256), (128, 384), (192, 512)]:
        m = models.Decoder(make_cfg(d_model=d, n_heads=4, n_kv_heads=None, n_layers=1))
        ffn = m.blocks[0].ffn
        assert ffn.w_in.weight.shape == (2 * F, d)
        assert ffn.w2.weight.shape == (d, F)


def test_mlp_hidden_width_auto_and_count():
    d, L = 64, 2
    m = models.Decoder(make_cfg(d_model=d, n_layers=L, n_kv_heads=None, ffn={"kind": "mlp", "activation": "gelu"}))
    assert m.blocks[0].ffn.w1.weight.shape == (4 * d, d)
    expected = V * d + L * (4 * d * d + 2 * d * 4 * d + 2 * d) + d
    assert n_params(m) == expected


def test_tied_vs_untied():
    tied = make_model(tie_embeddings=True)
    untied = make_model(tie_embeddings=False)
    names_tied = dict(tied.named_parameters())
    names_untied = dict(untied.named_parameters())
    assert not any(n.startswith("head") for n in names_tied)
    assert tied.head is None
    assert "head.weight" in names_untied
    assert untied.head.weight.shape == (V, 64)
    assert n_params(untied) - n_params(tied) == V * 64

    # the tied head really is the embedding: logits = final_norm(h) @ E^T; perturbing E changes logits
    x = ids(2, 7)
    captured = {}
    hook = tied.final_norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    logits = tied(x).logits
    hook.remove()
    torch.testing.assert_close(logits, captured["h"] @ tied.embed.weight.t(), rtol=0, atol=1e-12)

    # untied: head independent of the embedding
    captured.clear()
    hook = untied.final_norm.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    logits_u = untied(x).logits
    hook.remove()
    torch.testing.assert_close(logits_u, captured["h"] @ untied.head.weight.t(), rtol=0, atol=1e-12)
    assert not torch.equal(untied.head.weight, untied.embed.weight)


# ----------------------------------------------------------------------------- causality
@pytest.mark.parametrize("over", [{}, {"n_kv_heads": None}, {"layers": window_layers(3, "AS")},
                                  {"qk_norm": True}], ids=["gqa", "mha", "window", "qk_norm"])
def test_causality(over):
    m = make_model(**over)
    x = ids(2, 16)
    base = m(x).logits
    g = torch.Generator().manual_seed(5)
    for t in (0, 4, 9, 14):
        y = x.clone()
        y[:, t + 1:] = torch.randint(0, V, (2, 16 - t - 1), generator=g)
        assert not torch.equal(x, y)
        out = m(y).logits
        torch.testing.assert_close(out[:, :t + 1], base[:, :t + 1], rtol=0, atol=1e-12)
        assert (out[:, t + 1:] - base[:, t + 1:]).abs().max() > 1e-6  # the change is visible later


# ----------------------------------------------------------------------------- GQA
@pytest.mark.parametrize("n_kv_heads", [1, 2])
@pytest.mark.parametrize("window", [None, 4])
def test_gqa_equals_mha_with_repeated_kv(n_kv_heads, window):
    H, d = 4, 64
    dh = d // H
    group = H // n_kv_heads
    layers = window_layers(window, "S") if window else {}
    gqa = make_model(n_heads=H, n_kv_heads=n_kv_heads, **({"layers": layers} if layers else {}))
    mha = make_model(n_heads=H, n_kv_heads=None, **({"layers": layers} if layers else {}))
    src = gqa.state_dict()
    dst = {}
    for name, w in src.items():
        if name.endswith("mixer.wk.weight") or name.endswith("mixer.wv.weight"):
            w = w.view(n_kv_heads, dh, d).repeat_interleave(group, dim=0).reshape(H * dh, d)
        dst[name] = w
    mha.load_state_dict(dst)
    x = ids(2, 13)
    a = gqa(x).logits
    b = mha(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- sliding window
def test_sliding_window_receptive_field_one_layer():
    w, T = 4, 16
    m = make_model(n_layers=1, layers=window_layers(w))
    x = ids(1, T)
    base = m(x).logits
    g = torch.Generator().manual_seed(3)
    for t in range(w, T):
        # tokens before t-w+1 are outside the window of position t
        y = x.clone()
        y[:, : t - w + 1] = torch.randint(0, V, (1, t - w + 1), generator=g)
        out = m(y).logits
        torch.testing.assert_close(out[:, t], base[:, t], rtol=0, atol=1e-12)
        # the oldest token inside the window does matter
        z = x.clone()
        z[:, t - w + 1] = (x[:, t - w + 1] + 1) % V
        out = m(z).logits
        assert (out[:, t] - base[:, t]).abs().max() > 1e-6


def test_sliding_window_receptive_field_grows_with_depth():
    w, T, L = 3, 20, 2
    m = make_model(n_layers=L, layers=window_layers(w))
    x = ids(1, T)
    base = m(x).logits
    t = T - 1
    reach = L * (w - 1)         # position t sees back to t - L(w-1) after L layers
    y = x.clone()
    y[:, : t - reach] = (x[:, : t - reach] + 7) % V
    out = m(y).logits
    torch.testing.assert_close(out[:, t], base[:, t], rtol=0, atol=1e-12)
    z = x.clone()
    z[:, t - reach] = (x[:, t - reach] + 7) % V
    out = m(z).logits
    assert (out[:, t] - base[:, t]).abs().max() > 1e-6


def _rope_tables_f64(dh: int, T: int, theta: float, start: int = 0):
    inv = 1.0 / (theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh))
    ang = torch.outer(torch.arange(start, start + T, dtype=torch.float64), inv)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos(), emb.sin()


def _rope_f64(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return x * cos[None, :, None, :] + rot * sin[None, :, None, :]


def reference_attention(att, x, window, cos, sin):
    """Explicit masked-softmax attention (GQA by repeating K/V), float64 throughout."""
    B, T, d = x.shape
    H, Hkv, dh = att.n_heads, att.n_kv_heads, att.head_dim
    q = (x @ att.wq.weight.t()).view(B, T, H, dh)
    k = (x @ att.wk.weight.t()).view(B, T, Hkv, dh)
    v = (x @ att.wv.weight.t()).view(B, T, Hkv, dh)
    q, k = _rope_f64(q, cos, sin), _rope_f64(k, cos, sin)
    k = k.repeat_interleave(H // Hkv, dim=2)
    v = v.repeat_interleave(H // Hkv, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(dh)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    allowed = s <= t
    if window is not None:
        allowed = allowed & (t - s < window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = scores.softmax(-1)
    out = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * dh)
    return out @ att.wo.weight.t()


@pytest.mark.parametrize("window", [None, 1, 3, 8, 50])
def test_attention_matches_explicit_masked_softmax(window):
    T = 12
    layers = window_layers(window) if window is not None else {"pattern": "A"}
    m = make_model(n_layers=1, layers=layers)
    att = m.blocks[0].mixer
    torch.manual_seed(7)
    x = torch.randn(2, T, 64, dtype=torch.float64)
    cos, sin = _rope_tables_f64(att.head_dim, T, m.cfg.rope_theta)
    y = att(x, MixerContext(start=0, cos=cos, sin=sin))
    ref = reference_attention(att, x, window, cos, sin)
    # float64 end to end (RoPE included): the measured error is ~1e-17; a wrong mask is O(0.1)
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-13)


# ----------------------------------------------------------------------------- KV cache
CACHE_CASES = {
    "gqa": {},
    "mha": {"n_kv_heads": None},
    "mqa_qknorm": {"n_kv_heads": 1, "qk_norm": True},
    "window": {"layers": window_layers(3)},
    "mixed_window_gqa_qknorm": {"layers": window_layers(4, "SA"), "qk_norm": True, "n_layers": 3},
    "untied": {"tie_embeddings": False},
}


@pytest.mark.parametrize("case", list(CACHE_CASES))
def test_kv_cache_token_by_token_matches_full_forward(case):
    m = make_model(**CACHE_CASES[case])
    x = ids(2, 14)
    full = m(x).logits
    cache = m.new_cache()
    steps = []
    _out = m(x[:, :5], cache=cache)
    out, cache2 = _out.logits, _out.cache
    assert cache2 is cache
    assert cache.pos == 5
    steps.append(out)
    for t in range(5, 14):
        _out = m(x[:, t:t + 1], cache=cache)
        out, cache = _out.logits, _out.cache
        assert out.shape == (2, 1, V)
        steps.append(out)
    assert cache.pos == 14
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("case", ["gqa", "window"])
def test_kv_cache_multi_token_chunks(case):
    m = make_model(**CACHE_CASES[case])
    x = ids(1, 15)
    full = m(x).logits
    cache = m.new_cache()
    outs = []
    for a, b in [(0, 4), (4, 7), (7, 8), (8, 15)]:
        _out = m(x[:, a:b], cache=cache)
        out, cache = _out.logits, _out.cache
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-10)


def test_kv_cache_beyond_max_seq_len():
    # RoPE tables grow on demand; decoding past max_seq_len still matches the full forward
    m = make_model(max_seq_len=8, layers=window_layers(5, "AS"))
    x = ids(1, 20)
    full = m(x).logits
    cache = m.new_cache()
    outs = [m(x[:, :6], cache=cache).logits]
    for t in range(6, 20):
        outs.append(m(x[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------- doc mask
def test_doc_mask_isolates_documents():
    m = make_model(doc_mask=True)
    T = 12
    x = ids(2, T)
    doc_ids = torch.tensor([[0] * 5 + [1] * 7, [0] * 3 + [1] * 4 + [2] * 5])
    base = m(x, doc_ids=doc_ids).logits
    y = x.clone()
    y[0, :5] = (x[0, :5] + 11) % V          # doc 0 of row 0
    y[1, 3:7] = (x[1, 3:7] + 11) % V        # doc 1 of row 1
    out = m(y, doc_ids=doc_ids).logits
    torch.testing.assert_close(out[0, 5:], base[0, 5:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, 7:], base[1, 7:], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1, :3], base[1, :3], rtol=0, atol=1e-12)
    assert (out[0, :5] - base[0, :5]).abs().max() > 1e-6
    assert (out[1, 3:7] - base[1, 3:7]).abs().max() > 1e-6

    # the same document boundary does leak without doc_mask
    plain = make_model(doc_mask=False)
    a = plain(x, doc_ids=doc_ids).logits
    b = plain(y, doc_ids=doc_ids).logits
    assert (a[0, 5:] - b[0, 5:]).abs().max() > 1e-6


def test_doc_mask_single_document_equals_plain_causal():
    m = make_model(doc_mask=True)
    x = ids(2, 10)
    a = m(x, doc_ids=torch.zeros(2, 10, dtype=torch.long)).logits
    b = m(x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_doc_mask_document_equals_its_own_forward():
    # a document that starts mid-window gets exactly the logits it gets when run alone
    m = make_model(doc_mask=True, layers=window_layers(6, "AS"))
    x = ids(1, 14)
    doc_ids = torch.tensor([[0] * 4 + [1] * 10])
    joint = m(x, doc_ids=doc_ids).logits
    alone = m(x[:, 4:]).logits
    # RoPE is relative, so the shifted start position does not matter (float64: rounding only)
    torch.testing.assert_close(joint[:, 4:], alone, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- block / init
def test_residual_multiplier_is_one():
    m = make_model()
    for block in m.blocks:
        assert hasattr(block, "residual_multiplier")
        assert block.residual_multiplier == 1.0


def _hidden_and_output_mats(m):
    hidden, out = [], []
    for block in m.blocks:
        att, ffn = block.mixer, block.ffn
        hidden += [att.wq.weight, att.wk.weight, att.wv.weight, ffn.w_in.weight]
        out += [att.wo.weight, ffn.w2.weight]
    return hidden, out


@pytest.mark.parametrize("scaling", [False, True])
def test_init_std(scaling):
    std, L = 0.02, 4
    torch.manual_seed(0)
    m = models.Decoder(make_cfg(d_model=256, n_layers=L, n_heads=4, n_kv_heads=None, init_std=std,
                                residual_init_scaling=scaling, tie_embeddings=False))
    hidden, out = _hidden_and_output_mats(m)
    out_std = std / math.sqrt(2 * L) if scaling else std
    for w in hidden + [m.embed.weight, m.head.weight]:
        assert abs(w.std().item() - std) / std < 0.05
        assert abs(w.mean().item()) < 0.1 * std
    for w in out:
        assert abs(w.std().item() - out_std) / out_std < 0.05
    for name, p in m.named_parameters():
        if p.dim() == 1:  # norm gains start at one
            assert torch.equal(p, torch.ones_like(p)), name


# ----------------------------------------------------------------------------- norms
def test_rmsnorm_formula_float32():
    torch.manual_seed(0)
    n = RMSNorm(16, eps=1e-6)
    with torch.no_grad():
        n.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 3
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * n.weight
    torch.testing.assert_close(n(x), ref, rtol=1e-6, atol=1e-6)


def test_rmsnorm_float64_exact():
    torch.manual_seed(0)
    eps = 1e-6
    n = RMSNorm(16, eps=eps).double()
    with torch.no_grad():
        n.weight.copy_(torch.randn(16, dtype=torch.float64))
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3
    y = n(x)
    assert y.dtype == torch.float64
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * n.weight
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_layernorm_float64_exact():
    torch.manual_seed(0)
    eps = 1e-6
    n = LayerNorm(16, eps=eps).double()
    with torch.no_grad():
        n.weight.copy_(torch.randn(16, dtype=torch.float64))
        n.bias.copy_(torch.randn(16, dtype=torch.float64))
    x = torch.randn(3, 5, 16, dtype=torch.float64) * 3 + 1
    y = n(x)
    assert y.dtype == torch.float64
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + eps) * n.weight + n.bias
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- RoPE
def _rope_scores(dtype, dh=16, T=40, theta=10000.0):
    torch.manual_seed(0)
    rope = RotaryEmbedding(dh, T, theta).to(dtype)
    cos, sin = rope(0, T)
    q = torch.randn(dh, dtype=dtype)
    k = torch.randn(dh, dtype=dtype)
    Q = apply_rope(q.expand(1, T, 1, dh), cos, sin)[0, :, 0]   # q rotated to every position
    K = apply_rope(k.expand(1, T, 1, dh), cos, sin)[0, :, 0]
    return q, k, Q, K, Q @ K.t()                               # scores[m, n] = <R_m q, R_n k>


def test_rope_scores_depend_only_on_relative_position():
    q, k, Q, K, S = _rope_scores(torch.float32)
    T = S.shape[0]
    for s in (1, 5, 17):
        torch.testing.assert_close(S[s:, s:], S[:-s, :-s], rtol=0, atol=1e-4)
    # position 0 is the identity; rotations preserve norms
    torch.testing.assert_close(Q[0], q, rtol=0, atol=1e-6)
    torch.testing.assert_close(Q.norm(dim=-1), q.norm().expand(T), rtol=1e-5, atol=1e-5)
    # rotate-half convention: pair (i, i + dh/2) rotated by angle pos * theta^(-2i/dh)
    dh = q.shape[0]
    pos, i = 3, 2
    ang = pos * 10000.0 ** (-2 * i / dh)
    c, s_ = math.cos(ang), math.sin(ang)
    torch.testing.assert_close(Q[pos, i], q[i] * c - q[i + dh // 2] * s_, rtol=0, atol=1e-5)
    torch.testing.assert_close(Q[pos, i + dh // 2], q[i + dh // 2] * c + q[i] * s_, rtol=0, atol=1e-5)


def test_rope_float64_precision():
    q, k, Q, K, S = _rope_scores(torch.float64)
    assert Q.dtype == torch.float64
    for s in (1, 5, 17):
        torch.testing.assert_close(S[s:, s:], S[:-s, :-s], rtol=0, atol=1e-12)
    dh = q.shape[0]
    ref_cos, ref_sin = _rope_tables_f64(dh, S.shape[0], 10000.0)
    ref = _rope_f64(q.expand(1, S.shape[0], 1, dh), ref_cos, ref_sin)[0, :, 0]
    torch.testing.assert_close(Q, ref, rtol=0, atol=1e-12)


def test_rope_relative_in_model_attention():
    # attention output of a token block is unchanged when the whole block is shifted in position
    m = make_model(n_layers=1)
    att = m.blocks[0].mixer
    torch.manual_seed(1)
    x = torch.randn(1, 9, 64, dtype=torch.float64)
    cos0, sin0 = _rope_tables_f64(att.head_dim, 9, m.cfg.rope_theta, start=0)
    cos1, sin1 = _rope_tables_f64(att.head_dim, 9, m.cfg.rope_theta, start=23)
    a = att(x, MixerContext(start=0, cos=cos0, sin=sin0))
    b = att(x, MixerContext(start=23, cos=cos1, sin=sin1))
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
