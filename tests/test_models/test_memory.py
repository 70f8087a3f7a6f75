"""Product-key memory layers (models/memory.py): "Memory Layers at Scale", Berges, Oguz et al.,
arXiv 2412.09764 (after "Large Memory Layers with Product Keys", Lample et al., arXiv 1907.05242).

Checked against brute force in float64: the product-key top-k equals a top-k over all n^2 full
keys [K1_i | K2_j]; the module equals a naive dense-gather implementation (gated or not, every
qk_norm); with knn = n and every slot kept, the read is dense softmax attention over the n^2
(key, value) pairs. Also: a shared value table is one tensor whose gradient is the sum of the
layers' contributions, its optimizer group has the absolute base LR `model.memory.value_lr`
(SP and CompleteP), bad sizes are ConfigErrors naming the key, a forward at 1M slots never forms
a tokens x slots score matrix (peak RSS in a subprocess), and a small decoder with a memory
layer trains.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from ablate_testing import make_cfg

import models
from models.config import model_config
from models.memory import ProductKeyMemory, product_key_topk
from models.registry import ConfigError
from train.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[2]
RTOL, ATOL = 1e-12, 1e-12


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _full_keys(keys: torch.Tensor) -> torch.Tensor:
    """(h, 2, n, k/2) sub-keys -> (h, n^2, k) full keys, row i * n + j = [K1_i | K2_j]."""
    h, _, n, half = keys.shape
    k1 = keys[:, 0][:, :, None, :].expand(h, n, n, half)
    k2 = keys[:, 1][:, None, :, :].expand(h, n, n, half)
    return torch.cat([k1, k2], dim=-1).reshape(h, n * n, 2 * half)


def _brute_topk(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    full = torch.einsum("mhd,hnd->mhn", q, _full_keys(keys))            # (M, h, n^2): dense scores
    return full.topk(k, dim=-1)


def _mem_model_cfg(**mem) -> dict:
    return {"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "max_seq_len": 32,
            "memory": {"layers": [1], "heads": 2, "k_dim": 8, "n_keys": 6, "knn": 3, "v_dim": 12, **mem}}


# ----------------------------------------------------------------------------- top-k
@pytest.mark.parametrize("heads, n, knn, k_dim", [
    (1, 5, 5, 4),          # knn = n
    (2, 7, 3, 6),
    (3, 16, 4, 8),
    (4, 8, 8, 8),          # knn = n
    (2, 32, 1, 4),
    (2, 12, 6, 10),
])
def test_product_key_topk_equals_brute_force_over_all_slots(heads, n, knn, k_dim):
    g = _gen(100 + n)
    q = torch.randn(37, heads, k_dim, dtype=torch.float64, generator=g)
    keys = torch.randn(heads, 2, n, k_dim // 2, dtype=torch.float64, generator=g)
    scores, slots = product_key_topk(q, keys, knn)
    ref_scores, ref_slots = _brute_topk(q, keys, knn)
    assert scores.shape == slots.shape == (37, heads, knn)
    assert torch.equal(slots, ref_slots)
    torch.testing.assert_close(scores, ref_scores, rtol=RTOL, atol=ATOL)
    assert bool((scores[..., :-1] >= scores[..., 1:]).all())              # best first


def test_product_key_topk_with_every_slot_kept_is_a_full_sort():
    g = _gen(7)
    q = torch.randn(11, 2, 6, dtype=torch.float64, generator=g)
    keys = torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=g)
    scores, slots = product_key_topk(q, keys, knn=5, final=25)
    ref_scores, ref_slots = _brute_topk(q, keys, 25)
    assert torch.equal(slots, ref_slots)
    assert torch.equal(slots.sort(-1).values, torch.arange(25).expand(11, 2, 25))   # a permutation
    torch.testing.assert_close(scores, ref_scores, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- the module
def _naive_memory(mem: ProductKeyMemory, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The memory layer written out: dense scores over all n^2 full keys, a top-knn, softmax,
    dense gathers V[idx], summed over heads and picks; SiLU-gated projection; optional gate."""
    B, T, d = x.shape
    h, k, n = mem.heads, mem.k_dim, mem.n
    half = k // 2

    def norm(t: torch.Tensor) -> torch.Tensor:
        if mem.qk_norm == "rms":
            return t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6)
        if mem.qk_norm == "l2":
            return F.normalize(t, dim=-1)
        return t

    q = (x.reshape(B * T, d) @ mem.wq.weight.t() + mem.wq.bias).reshape(B * T, h, k)
    q = torch.cat([norm(q[..., :half]), norm(q[..., half:])], dim=-1)
    sub = norm(mem.keys.reshape(h, 2, n, half))
    scores, idx = _brute_topk(q, sub, mem.knn)                           # (M, h, knn)
    w = torch.softmax(scores, dim=-1)
    bag = torch.zeros(B * T, values.shape[1], dtype=x.dtype)
    for t in range(B * T):
        for head in range(h):
            for j in range(mem.knn):
                bag[t] += w[t, head, j] * values[idx[t, head, j]]
    s = x.reshape(B * T, d) @ mem.w_s.weight.t() + mem.w_s.bias
    out = (bag * F.silu(s)) @ mem.w_out.weight.t() + mem.w_out.bias
    if mem.gate is not None:
        out = torch.sigmoid(x.reshape(B * T, d) @ mem.gate.weight.t()) * out
    return out.reshape(B, T, d)


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("qk_norm", ["none", "rms", "l2"])
def test_memory_layer_equals_a_naive_dense_gather_implementation(gated, qk_norm):
    torch.manual_seed(0)
    model = models.Decoder(model_config(_mem_model_cfg(gated=gated, qk_norm=qk_norm))).double()
    mem = model.blocks[1].ffn
    assert isinstance(mem, ProductKeyMemory) and (mem.gate is not None) == gated
    with torch.no_grad():                      # larger than the init, so every term matters
        for p in (mem.wq.bias, mem.w_s.bias, mem.w_out.bias):
            p.normal_(0.0, 0.5, generator=_gen(1))
        if gated:
            mem.gate.weight.normal_(0.0, 0.5, generator=_gen(2))
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=_gen(3))
    out = mem(x, None)
    ref = _naive_memory(mem, x, mem.values.weight)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=RTOL, atol=ATOL)


def test_all_slots_softmax_read_equals_dense_attention_over_the_slots():
    """knn = n, every slot kept: the softmax-weighted value read per head is softmax attention
    with the n^2 full keys as keys and the table rows as values."""
    g = _gen(11)
    h, n, k, v, M = 3, 6, 8, 5, 17
    q = torch.randn(M, h, k, dtype=torch.float64, generator=g)
    keys = torch.randn(h, 2, n, k // 2, dtype=torch.float64, generator=g)
    V = torch.randn(n * n, v, dtype=torch.float64, generator=g)
    scores, slots = product_key_topk(q, keys, knn=n, final=n * n)
    read = (torch.softmax(scores, -1)[..., None] * V[slots]).sum(-2)          # (M, h, v)
    full = _full_keys(keys)                                                   # (h, N, k)
    attn = torch.softmax(torch.einsum("mhd,hnd->mhn", q, full), dim=-1)       # (M, h, N)
    dense = torch.einsum("mhn,nv->mhv", attn, V)
    torch.testing.assert_close(read, dense, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- shared values
def _shared_model() -> models.Decoder:
    torch.manual_seed(0)
    cfg = model_config({"d_model": 16, "n_layers": 3, "n_heads": 2, "vocab_size": 64, "max_seq_len": 32,
                        "memory": {"layers": [0, 2], "heads": 2, "k_dim": 8, "n_keys": 5, "knn": 3,
                                   "v_dim": 8, "share_values": True}})
    return models.Decoder(cfg).double()


def _value_grad(model: models.Decoder, ids: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).losses["ce"].value.backward()
    return model.shared["memory"].weight.grad.clone()


def test_shared_value_table_is_one_tensor_whose_grad_sums_the_layers(monkeypatch):
    model = _shared_model()
    table = model.shared["memory"].weight
    ctx = SimpleNamespace(shared=model.shared)
    for i in (0, 2):
        assert model.blocks[i].ffn.values is None
        assert model.blocks[i].ffn.value_table(ctx) is table
    assert sum(p is table for p in model.parameters()) == 1
    assert not isinstance(model.blocks[1].ffn, ProductKeyMemory)

    ids = torch.randint(0, 64, (2, 9), generator=_gen(5))
    total = _value_grad(model, ids)
    parts = []
    for own in (0, 2):                         # the other layer reads a detached copy: no grad through it
        other = model.blocks[2 - own].ffn
        monkeypatch.setattr(other, "value_table", lambda c: c.shared["memory"].weight.detach())
        parts.append(_value_grad(model, ids))
        monkeypatch.undo()
    assert all(bool(p.abs().sum() > 0) for p in parts)
    assert not torch.allclose(parts[0], parts[1])
    torch.testing.assert_close(total, parts[0] + parts[1], rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- optimizer groups
def _cfg(**model_over):
    model = {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 16, "vocab_size": 320,
             "memory": {"layers": [1], "heads": 2, "k_dim": 8, "n_keys": 8, "knn": 4, "value_lr": 0.005}}
    for key, value in model_over.items():
        model[key] = {**model.get(key, {}), **value} if isinstance(value, dict) else value
    return make_cfg({"device": "cpu", "model": model, "tokenizer": {"vocab_size": 320},
                     "data": {"seq_len": 16}, "optim": {"name": "adamw", "lr": 1e-3}})


@pytest.mark.parametrize("share", [False, True])
def test_value_table_group_has_the_absolute_value_lr(share):
    cfg = _cfg(memory={"share_values": share})
    model = models.Decoder(cfg.model)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    value = groups.pop("memory_value")
    assert value["lr"] == value["base_lr"] == 0.005
    assert len(value["params"]) == 1 and value["params"][0].shape == (64, 32)
    assert "memory_key" in groups
    assert {g["lr"] for g in groups.values()} == {1e-3}


@pytest.mark.parametrize("alpha, mult", [(None, 1.0), (0.5, 2.0 ** -0.5)])
def test_value_lr_follows_the_completep_depth_rule(alpha, mult):
    cfg = _cfg(n_layers=4, param={"kind": "completep", "base_depth": 2, "base_width": 32, "alpha": alpha},
               memory={"layers": [1, 3]})
    model = models.Decoder(cfg.model)
    value = next(g for g in param_groups(model, cfg) if g["name"] == "memory_value")
    assert value["lr"] == pytest.approx(0.005 * mult, rel=1e-12)
    assert value["base_lr"] == value["lr"]


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("memory, key", [
    ({"layers": [2]}, "model.memory.layers[0]"),
    ({"layers": [0, -1]}, "model.memory.layers[1]"),
    ({"layers": [1, 1]}, "model.memory.layers"),
    ({"layers": [0], "n_keys": 4, "knn": 5}, "model.memory.knn"),
    ({"layers": [0], "k_dim": 7}, "model.memory.k_dim"),
    ({"layers": [0], "n_keys": 2 ** 32, "knn": 4}, "model.memory.n_keys"),
])
def test_bad_memory_configs_name_the_culprit(memory, key):
    d = {"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": 64, "memory": {"k_dim": 8, **memory}}
    with pytest.raises(ConfigError) as info:
        model_config(d, path="model")
    assert info.value.key == key


# ----------------------------------------------------------------------------- peak memory
_PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import torch
    from models.config import model_config
    from models.memory import ProductKeyMemory

    def rss_now():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    def maxrss():                                 # the peak resident set since the last reset (VmHWM)
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:   # "5": reset the peak RSS to the current RSS
            f.write("5")

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = model_config({"d_model": 32, "n_layers": 1, "n_heads": 2, "vocab_size": 64,
                        "memory": {"layers": [0], "heads": 2, "k_dim": 32, "n_keys": 1024, "knn": 8,
                                   "v_dim": 16, "share_values": False}})
    mem = ProductKeyMemory(cfg, 0)
    mem.reset_parameters()
    mem.values.reset_parameters()                 # touches the 64 MiB table before the baseline
    mem(torch.randn(1, 1, 32))                    # warm-up: kernels and allocator, one token
    x = torch.randn(4, 64, 32)
    reset_peak()                                  # earlier transients (imports, init) do not count
    before_max, before_now = maxrss(), rss_now()
    out = mem(x)
    out.sum().backward() if "--backward" in sys.argv else None
    after = maxrss()
    big = torch.ones(64, 1024, 1024, dtype=torch.float32)   # 256 MiB, touched: the probe sees it
    probe = maxrss()
    print(json.dumps({"table": mem.values.weight.numel() * 4, "before_max": before_max,
                      "before_now": before_now, "after": after, "probe": probe,
                      "finite": bool(torch.isfinite(out).all())}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's peak-RSS reset")
def test_forward_at_a_million_slots_never_forms_a_dense_score_matrix(tmp_path):
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    tokens, heads, n = 256, 2, 1024
    scores = tokens * heads * n * 8                  # the two (tokens, heads, n) sub-key score tensors
    bound = scores + 64 * 2 ** 20                     # + a generous constant
    dense = tokens * n * n * 8                        # a dense tokens x N score matrix: 2 GiB
    rise = r["after"] - min(r["before_max"], r["before_now"])
    mib = {k: round(v / 2 ** 20, 1) for k, v in r.items() if k != "finite"}
    msg = (f"forward peak RSS rise {rise / 2 ** 20:.1f} MiB, bound {bound / 2 ** 20:.1f} MiB "
           f"(dense scores would be {dense / 2 ** 20:.0f} MiB); figures (MiB): {mib}")
    assert r["finite"], msg
    assert r["table"] == 64 * 2 ** 20, msg
    assert r["probe"] - r["after"] >= 200 * 2 ** 20, "ru_maxrss did not register a 256 MiB allocation: " + msg
    assert rise < bound < dense, msg


# ----------------------------------------------------------------------------- training
@pytest.mark.parametrize("share", [False, True])
def test_decoder_with_a_memory_layer_trains(share):
    cfg = _cfg(memory={"layers": [0], "share_values": share, "value_lr": 1e-2}, n_layers=2)
    cfg.optim.lr = 1e-2
    torch.manual_seed(0)
    model = models.Decoder(cfg.model)
    opt = build_optimizer(model, cfg)
    ids = torch.randint(0, 320, (4, 16), generator=_gen(9))
    losses = []
    for _ in range(10):
        opt.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).losses["ce"].value / ids.numel()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.9 * losses[0], losses
    table = model.shared["memory"].weight if share else model.blocks[0].ffn.values.weight
    assert table.grad is not None and bool(table.grad.abs().sum() > 0)


def test_topk_refuses_a_final_count_it_cannot_get_exactly():
    q = torch.randn(3, 1, 8, dtype=torch.float64)
    keys = torch.randn(1, 2, 16, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="exact only with knn = n"):
        product_key_topk(q, keys, knn=4, final=8)
