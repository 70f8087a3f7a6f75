"""Stochastic activations ("Stochastic activations", arXiv 2509.22358): exactness at p=0 / p=1, mask statistics,
mask reuse in backward, the counter-based keys (world-size / micro-batch invariance, layer,
seed, position), granularities, eval modes and the ReLU fine-tune flag. Float64 throughout."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import models
from models.activations.stochastic import (MASK32, StochasticActivation, absorb, mix32, silu_mask,
                                           silu_threshold, token_hash)
from models.config import StochasticConfig, model_config
from models.context import MixerContext

V = 61


def act_for(p: float, granularity: str = "element", eval_mode: str = "relu", seed: int = 0, layer: int = 0):
    cfg = model_config({"d_model": 16, "n_layers": 1, "n_heads": 2, "vocab_size": V,
                        "ffn": {"kind": "mlp", "activation": "stochastic",
                                "stochastic": {"p": p, "granularity": granularity, "eval_mode": eval_mode,
                                               "seed": seed}}})
    return StochasticActivation(64, cfg, layer)


def ctx_for(sample_index=None, start: int = 0) -> MixerContext:
    return MixerContext(start=start, cos=torch.zeros(1), sin=torch.zeros(1), sample_index=sample_index)


def rand_u(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def grads(fn, u, g):
    u = u.detach().clone().requires_grad_(True)
    y = fn(u)
    (y * g).sum().backward()
    return y.detach(), u.grad


# ----------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("granularity", ["element", "token", "call"])
def test_p0_is_exactly_relu_and_p1_exactly_silu(granularity):
    u = rand_u(3, 7, 40)
    g = rand_u(3, 7, 40, seed=1)
    ctx = ctx_for(torch.tensor([11, 12, 13]))
    for p, ref in ((0.0, F.relu), (1.0, F.silu)):
        act = act_for(p, granularity)
        y, gu = grads(lambda u: act(u, ctx), u, g)
        y_ref, gu_ref = grads(ref, u, g)
        assert torch.equal(y, y_ref), (p, granularity)
        assert torch.equal(gu, gu_ref), (p, granularity)


def test_threshold_edges():
    assert silu_threshold(0.0) == 0 and silu_threshold(1.0) == 1 << 32
    assert silu_threshold(0.5) == 1 << 31


# ----------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_silu_fraction_within_3_sigma(p):
    B, T, Fh = 4, 32, 256
    mask = silu_mask((B, T, Fh), p, "element", seed=5, layer=2, sample_index=torch.arange(100, 100 + B))
    n = mask.numel()
    assert abs(mask.double().mean().item() - p) <= 3 * math.sqrt(p * (1 - p) / n)
    # per token: n = B * T draws
    tok = silu_mask((16, 64, 8), p, "token", seed=5, layer=2)
    assert tok.shape == (16, 64, 1)
    assert abs(tok.double().mean().item() - p) <= 3 * math.sqrt(p * (1 - p) / tok.numel())


def test_silu_fraction_on_negative_inputs_seen_through_gradients():
    """Reference test 2 on u < 0: a nonzero gradient means SiLU was drawn; fraction = p +- 3 sigma."""
    p = 0.3
    act = act_for(p)
    u = -(rand_u(4, 32, 64).abs() + 0.1)
    _, gu = grads(lambda u: act(u, ctx_for()), u, torch.ones_like(u))
    frac = (gu != 0).double().mean().item()
    assert abs(frac - p) <= 3 * math.sqrt(p * (1 - p) / u.numel())


# ----------------------------------------------------------------------------- backward
def test_gradient_nonzero_on_negative_inputs_iff_silu_drawn():
    act = act_for(0.5)
    u = rand_u(2, 9, 48)
    idx = torch.tensor([7, 1 << 40])                 # indices beyond 32 bits work too
    ctx = ctx_for(idx)
    mask = act.mask(u, ctx)
    _, gu = grads(lambda u: act(u, ctx), u, torch.ones_like(u))
    neg = u < 0
    assert torch.equal((gu != 0)[neg], mask.expand_as(u)[neg])
    # and the gradient is exactly the drawn branch's derivative everywhere
    _, g_relu = grads(F.relu, u, torch.ones_like(u))
    _, g_silu = grads(F.silu, u, torch.ones_like(u))
    assert torch.equal(gu, torch.where(mask, g_silu, g_relu))


def test_backward_reuses_the_forward_mask():
    """Change everything a re-draw would use between forward and backward: the gradient is unchanged."""
    act = act_for(0.5)
    u = rand_u(2, 6, 32).requires_grad_(True)
    idx = torch.tensor([3, 4])
    ctx = ctx_for(idx)
    expected_mask = act.mask(u, ctx)
    y = act(u, ctx)
    idx.add_(1000)                       # the sample indices the forward used, mutated in place
    act.p, act.seed, act.layer_idx = 1.0, 99, 5
    y.sum().backward()
    _, g_relu = grads(F.relu, u.detach(), torch.ones_like(u))
    _, g_silu = grads(F.silu, u.detach(), torch.ones_like(u))
    assert torch.equal(u.grad, torch.where(expected_mask, g_silu, g_relu))


def test_gradcheck_with_context():
    for granularity in ("element", "token"):
        act = act_for(0.5, granularity)
        u = rand_u(2, 3, 8).requires_grad_(True)
        ctx = ctx_for(torch.tensor([10, 20]), start=5)
        assert torch.autograd.gradcheck(lambda u: act(u, ctx), (u,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- keys
def test_hash_tensor_path_equals_python_ints():
    """int64 arithmetic never overflows, so tensors (any device) give the exact 32-bit hash."""
    g = torch.Generator().manual_seed(0)
    xs = torch.randint(0, 1 << 32, (500,), generator=g, dtype=torch.int64)
    ys = torch.randint(0, 1 << 32, (500,), generator=g, dtype=torch.int64)
    out = absorb(mix32(xs), ys)
    for x, y, o in zip(xs.tolist(), ys.tolist(), out.tolist()):
        assert o == absorb(mix32(x), y) and 0 <= o <= MASK32
    big = torch.tensor([0, 1, (1 << 32) + 1, (1 << 50) + 3])
    h = token_hash(-7, 3, big, 10, 4)
    assert h.shape == (4, 4) and int(h.min()) >= 0 and int(h.max()) <= MASK32
    assert len(set(h.flatten().tolist())) == 16


def test_masks_are_invariant_to_world_size_and_micro_batching():
    """Same global samples -> same masks, however the global batch is split over ranks and micro-batches."""
    shape_t, Fh = 12, 32
    global_idx = torch.arange(40, 48)                 # one global batch of 8 samples
    full = silu_mask((8, shape_t, Fh), 0.5, "element", 3, 1, global_idx)
    for world, micro in ((1, 8), (2, 4), (4, 2), (8, 1), (2, 2)):
        per_rank = 8 // world
        for rank in range(world):
            rows = global_idx[rank * per_rank:(rank + 1) * per_rank]
            for lo in range(0, per_rank, micro):
                part = rows[lo:lo + micro]
                m = silu_mask((len(part), shape_t, Fh), 0.5, "element", 3, 1, part)
                assert torch.equal(m, full[part - 40])
    # row order does not matter either: a permuted batch gets permuted masks
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4])
    assert torch.equal(silu_mask((8, shape_t, Fh), 0.5, "element", 3, 1, global_idx[perm]), full[perm])


def test_decoder_outputs_invariant_to_micro_batch_split():
    torch.manual_seed(0)
    cfg = model_config({"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": V,
                        "ffn": {"kind": "glu", "activation": "stochastic", "stochastic": {"p": 0.5}}})
    m = models.Decoder(cfg).double().train()
    x = torch.randint(0, V, (6, 10), generator=torch.Generator().manual_seed(1))
    idx = torch.arange(120, 126)
    full = m(x, sample_index=idx).logits
    halves = torch.cat([m(x[:3], sample_index=idx[:3]).logits, m(x[3:], sample_index=idx[3:]).logits])
    torch.testing.assert_close(halves, full, rtol=0, atol=1e-12)
    other = m(x, sample_index=idx + 6).logits          # other samples (same tokens) -> other masks
    assert (other - full).abs().max() > 1e-6


def test_masks_depend_on_layer_seed_sample_and_position():
    B, T, Fh = 2, 8, 64
    idx = torch.tensor([0, 1])
    base = silu_mask((B, T, Fh), 0.5, "element", 0, 0, idx)
    for kwargs in ({"seed": 1}, {"layer": 1}):
        args = {"seed": 0, "layer": 0, **kwargs}
        other = silu_mask((B, T, Fh), 0.5, "element", args["seed"], args["layer"], idx)
        assert 0.3 < (other != base).double().mean() < 0.7
    assert not torch.equal(base[0], base[1])                    # per sample
    assert not torch.equal(base[:, 0], base[:, 1])              # per position
    shifted = silu_mask((B, T - 3, Fh), 0.5, "element", 0, 0, idx, start=3)
    assert torch.equal(shifted, base[:, 3:])                    # keyed by absolute position


def test_granularities():
    B, T, Fh = 3, 16, 32
    tok = silu_mask((B, T, Fh), 0.5, "token", 0, 0)
    assert tok.shape == (B, T, 1) and 0 < tok.double().mean() < 1
    call = silu_mask((B, T, Fh), 0.5, "call", 0, 0)
    assert call.shape == (1, 1, 1)
    # call: one draw per (layer, step), fraction ~ p over steps, the same for every micro-batch
    p, steps = 0.3, 800
    act = act_for(p, "call")
    draws = []
    u = rand_u(1, 2, 4)
    for s in range(steps):
        act.set_train_step(s)
        draws.append(act.call_silu)
        assert bool(silu_mask((1, 2, 4), p, "call", 0, 0, step=s)) == act.call_silu
    assert abs(sum(draws) / steps - p) <= 3 * math.sqrt(p * (1 - p) / steps)
    act.set_train_step(int(draws.index(True)))
    assert torch.equal(act(u, ctx_for()), F.silu(u)) and torch.equal(act(u[:, :1], ctx_for()), F.silu(u[:, :1]))
    act.set_train_step(int(draws.index(False)))
    assert torch.equal(act(u, ctx_for()), F.relu(u))


def test_without_sample_index_every_row_is_sample_0():
    """Batching never changes a result: a row's masks then depend on its positions only."""
    act = act_for(0.5)
    u = rand_u(3, 4, 16)
    zeros = torch.zeros(3, dtype=torch.int64)
    assert torch.equal(act(u, None), act(u, ctx_for(zeros)))
    assert torch.equal(act(u, ctx_for()), act(u, ctx_for(zeros)))
    assert torch.equal(act(u[1:2], None), act(u, None)[1:2])


# ----------------------------------------------------------------------------- modes
def test_eval_modes_are_explicit():
    u = rand_u(2, 5, 16)
    ctx = ctx_for(torch.tensor([4, 5]))
    train_out = act_for(0.5).train()(u, ctx)
    assert torch.equal(act_for(0.5, eval_mode="relu").eval()(u, ctx), F.relu(u))
    assert torch.equal(act_for(0.5, eval_mode="silu").eval()(u, ctx), F.silu(u))
    assert torch.equal(act_for(0.5, eval_mode="stochastic").eval()(u, ctx), train_out)
    assert StochasticConfig().eval_mode == "relu"                 # the default is the deterministic sparse path


def test_relu_finetune_flag_forces_relu_in_train_and_eval():
    u = rand_u(2, 5, 16)
    for eval_mode in ("silu", "stochastic"):
        act = act_for(0.9, eval_mode=eval_mode)
        act.relu_finetune = True
        assert torch.equal(act.train()(u, ctx_for()), F.relu(u))
        assert torch.equal(act.eval()(u, ctx_for()), F.relu(u))


def test_kv_cache_decode_matches_full_forward_in_stochastic_eval_mode():
    """Masks keyed by absolute position: incremental decoding reproduces the full forward."""
    torch.manual_seed(0)
    cfg = model_config({"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": V,
                        "ffn": {"kind": "mlp", "activation": "stochastic",
                                "stochastic": {"p": 0.5, "eval_mode": "stochastic"}}})
    m = models.Decoder(cfg).double().eval()
    x = torch.randint(0, V, (2, 9), generator=torch.Generator().manual_seed(2))
    full = m(x).logits
    cache = m.new_cache()
    outs = [m(x[:, :4], cache=cache).logits]
    for t in range(4, 9):
        outs.append(m(x[:, t:t + 1], cache=cache).logits)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-10)


def test_seed_default_and_layer_index():
    cfg = model_config({"d_model": 16, "n_layers": 3, "n_heads": 2, "vocab_size": V,
                        "ffn": {"kind": "mlp", "activation": "stochastic"}})
    assert cfg.ffn.stochastic.seed is None
    m = models.Decoder(cfg)
    assert [b.ffn.act.layer_idx for b in m.blocks] == [0, 1, 2]
    assert all(b.ffn.act.seed == 0 for b in m.blocks)         # outside a run: seed 0
