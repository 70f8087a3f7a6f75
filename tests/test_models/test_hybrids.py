"""Hybrid layer patterns (the two hybrids of arXiv 2406.06484 build the layers they say), the
flex_attention path for sliding-window / document-masked attention (eager flex on CPU equals the
dense-mask path in float64, forward only: flex has no CPU backward; on CUDA compiled flex matches
it at bf16, forward and backward), and the rolling KV cache of sliding-window layers (decoding
equals the full forward while the cache never holds more than `window` keys)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ablate_testing import err_ratio

import models
from models.config import model_config
from models.mixers.attention import Attention

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]
DOCS = torch.tensor([[0] * 5 + [1] * 19 + [2] * 8, [0] * 16 + [1] * 16])


def _model(mixers: dict, pattern, **over) -> models.Decoder:
    data = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 64,
            "layers": {"pattern": pattern, "mixers": mixers}, **over}
    torch.manual_seed(0)
    return models.Decoder(model_config(data)).double()


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(("name", "layers"), [
    ("hybrid_swa", [("deltanet", None), ("attention", 256)] * 3),
    ("hybrid_global", [("deltanet", None), ("attention", None), ("deltanet", None), ("attention", None),
                       ("deltanet", None), ("deltanet", None)]),
])
def test_hybrid_patterns_build_the_right_layers(name, layers):
    from train.config import load_config

    cfg = load_config(REPO / "configs/ablations/mixers" / f"{name}.yaml")
    cfg.model.vocab_size = 64                           # a small embedding: the layers are the point
    with torch.device("meta"):
        m = models.Decoder(cfg.model)
    got = [(type(b.mixer).__name__.lower(), getattr(b.mixer, "window", None)) for b in m.blocks]
    assert got == layers
    kernels = {row["kernel"] for row in m.layer_summary() if row["mixer"] == "attention"}
    assert kernels == ({"sdpa_mask"} if name == "hybrid_swa" else {"sdpa_causal"})   # CPU: dense


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize(("window", "doc_mask", "kv_heads"), [(5, False, None), (None, True, None),
                                                              (7, True, 2)], ids=["window", "docs", "window-docs-gqa"])
def test_eager_flex_equals_the_dense_mask_in_float64(window, doc_mask, kv_heads):
    """T=32 with BLOCK_SIZE 128 is one partial block: flex's mask_mod decides every entry."""
    m = _model({"A": {"kind": "attention", "window": window}}, "A", doc_mask=doc_mask, n_kv_heads=kv_heads)
    ids = _ids(32)
    doc_ids = DOCS if doc_mask else None
    with torch.no_grad():                    # flex has no CPU backward (torch 2.13): forward only
        dense = m(ids, doc_ids=doc_ids).logits
        for block in m.blocks:
            block.mixer.use_flex = True
            assert block.mixer.kernel == "flex"
        flex = m(ids, doc_ids=doc_ids).logits
    assert (flex - dense).abs().max() < 1e-10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex_attention needs CUDA")
@pytest.mark.parametrize(("window", "doc_mask", "kv_heads"), [(64, False, None), (None, True, None),
                                                              (96, True, 2)], ids=["window", "docs", "window-docs-gqa"])
def test_compiled_flex_matches_the_dense_mask_at_bf16(window, doc_mask, kv_heads):
    """On CUDA a window or document mask takes compiled flex_attention (kernel `flex`); the dense
    (T, T) mask through SDPA is the reference: logits and every parameter's gradient under bf16
    autocast. T=300 is two full blocks of 128 and a partial one. Tolerances: error ratios 0.02
    (logits) and 0.03 (gradients), bf16 rounding in two different kernels through two layers."""
    dev = torch.device("cuda")
    data = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": kv_heads, "vocab_size": 64,
            "max_seq_len": 512, "doc_mask": doc_mask,
            "layers": {"pattern": "A", "mixers": {"A": {"kind": "attention", "window": window}}}}
    torch.manual_seed(0)
    m = models.Decoder(model_config(data)).to(dev)
    B, T = 2, 300
    ids = _ids(T, B).to(dev)
    doc_ids = (torch.cat([torch.zeros(B, 70), torch.ones(B, 150), torch.full((B, 80), 2.0)], 1).long().to(dev)
               if doc_mask else None)
    dy = torch.randn(B, T, 64, generator=torch.Generator().manual_seed(2)).to(dev)
    out = {}
    for use_flex in (False, True):
        for block in m.blocks:
            block.mixer.use_flex = use_flex
        assert m.blocks[0].mixer.kernel == ("flex" if use_flex else "sdpa_mask")
        m.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(ids, doc_ids=doc_ids).logits
        (logits.float() * dy).sum().backward()
        out[use_flex] = logits.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters()}
    (y_dense, g_dense), (y_flex, g_flex) = out[False], out[True]
    assert err_ratio(y_flex, y_dense) < 0.02
    for n, g in g_dense.items():
        assert err_ratio(g_flex[n], g) < 0.03, n


def test_plain_causal_attention_never_takes_flex():
    m = _model({"A": {"kind": "attention"}}, "A")
    m.blocks[0].mixer.use_flex = True
    assert m.blocks[0].mixer.kernel == "sdpa_causal"


@pytest.mark.parametrize("prefill", [1, 3, 11])
def test_rolling_cache_decodes_like_the_full_forward_with_memory_bounded_by_the_window(prefill):
    """A hybrid of a sliding-window layer (window 4) and a global one: 40 tokens, decoded one at a
    time after a prefill shorter or longer than the window."""
    w, T = 4, 40
    m = _model({"S": {"kind": "attention", "window": w}, "A": {"kind": "attention"}}, "SA")
    ids = _ids(T)
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        steps = [m(ids[:, :prefill], cache=cache).logits]
        held = []
        for t in range(prefill, T):
            steps.append(m(ids[:, t:t + 1], cache=cache).logits)
            held.append((cache.layers[0].k.shape[2], cache.layers[0].k.untyped_storage().nbytes()))
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10
    per_key = 2 * 4 * 8 * 8                                # B x H_kv x Dh x float64 bytes
    assert max(n for n, _ in held) == w and max(b for _, b in held) == w * per_key
    assert cache.layers[1].k.shape[2] == T                  # the global layer keeps everything


def test_rolling_cache_with_left_padding():
    """A left-padded row decodes as the same row unpadded: the pad mask is cut to the cached keys."""
    w = 3
    m = _model({"S": {"kind": "attention", "window": w}}, "S")
    ids = _ids(12, B=1)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), ids], 1)
    pad = torch.cat([torch.zeros(1, 4, dtype=torch.bool), torch.ones(1, 12, dtype=torch.bool)], 1)
    with torch.no_grad():
        want = m(ids).logits
        cache = m.new_cache()
        got = [m(padded[:, :6], cache=cache, pad_mask=pad[:, :6]).logits[:, 4:]]
        for t in range(6, 16):
            got.append(m(padded[:, t:t + 1], cache=cache, pad_mask=pad[:, :t + 1]).logits)
    assert (torch.cat(got, 1) - want).abs().max() < 1e-10
    assert isinstance(m.blocks[0].mixer, Attention) and cache.layers[0].k.shape[2] == w
