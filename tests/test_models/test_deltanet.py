"""DeltaNet (arXiv 2406.06484): the chunkwise WY form against the token recurrence (values and
gradients, float64), the delta property, streaming decode, packed documents, training, bad
input, and (CUDA only) fla's kernel against the PyTorch path at bf16 tolerances."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ablate_testing import err_ratio, train_losses

import models
from models.config import model_config
from models.context import MixerContext
from models.flops import flops_per_token
from models.mixers import deltanet as dn
from models.mixers.delta_rule import delta_rule_chunkwise, delta_rule_recurrent
from models.registry import ConfigError

F64 = torch.float64
DOCS = torch.tensor([[0] * 5 + [1] * 19 + [2] * 13 + [3] * 3,     # boundaries inside chunks of 16 and 32
                     [0] * 16 + [1] * 16 + [2] * 8])              # ... and on a chunk boundary


def _inputs(B: int = 2, H: int = 3, T: int = 40, dk: int = 8, dv: int = 6, seed: int = 0):
    """q, k (L2-normalised), v, beta = sigmoid(randn) and an initial state, float64."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, dk, generator=g, dtype=F64)
    k = F.normalize(torch.randn(B, H, T, dk, generator=g, dtype=F64), dim=-1)
    v = torch.randn(B, H, T, dv, generator=g, dtype=F64)
    beta = torch.randn(B, H, T, generator=g, dtype=F64).sigmoid()
    s0 = torch.randn(B, H, dk, dv, generator=g, dtype=F64)
    return q, k, v, beta, s0


def _cfg(mixer: dict | None = None, **over) -> models.ModelConfig:
    data = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 64,
            "layers": {"pattern": "D", "mixers": {"D": {"kind": "deltanet", "chunk_size": 16, **(mixer or {})}}}}
    return model_config({**data, **over})


def _model(mixer: dict | None = None, **over) -> models.Decoder:
    torch.manual_seed(0)
    return models.Decoder(_cfg(mixer, **over)).double()


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the two forms
@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("chunk", [16, 32, 64])
def test_chunkwise_equals_recurrence(chunk, docs):
    """T = 40 is a multiple of none of the chunk sizes; the initial state is not zero."""
    q, k, v, beta, s0 = _inputs()
    doc_ids = DOCS if docs else None
    o_rec, s_rec = delta_rule_recurrent(q, k, v, beta, s0, doc_ids)
    o_chunk, s_chunk = delta_rule_chunkwise(q, k, v, beta, chunk, s0, doc_ids)
    assert (o_chunk - o_rec).abs().max() < 1e-10
    assert (s_chunk - s_rec).abs().max() < 1e-10
    if docs:    # the initial state reaches the first document only
        o_zero, _ = delta_rule_recurrent(q, k, v, beta, None, doc_ids)
        assert torch.equal(o_zero[0, :, 5:], o_rec[0, :, 5:]) and not torch.allclose(o_zero[0, :, :5], o_rec[0, :, :5])


@pytest.mark.parametrize("docs", [False, True], ids=["one-doc", "packed"])
@pytest.mark.parametrize("chunk", [16, 64])
def test_chunkwise_gradients_equal_the_recurrence(chunk, docs):
    q, k, v, beta, s0 = _inputs(T=37)
    doc_ids = DOCS[:, :37] if docs else None
    g = torch.Generator().manual_seed(5)
    do, ds = torch.randn(2, 3, 37, 6, generator=g, dtype=F64), torch.randn(2, 3, 8, 6, generator=g, dtype=F64)
    grads = []
    for form in (delta_rule_recurrent, lambda *a: delta_rule_chunkwise(*a[:4], chunk, *a[4:])):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, beta, s0)]
        o, s = form(*leaves, doc_ids)
        torch.autograd.backward([o, s], [do, ds])
        grads.append([t.grad for t in leaves])
    for name, a, b in zip(("q", "k", "v", "beta", "s0"), *grads):
        assert (a - b).abs().max() < 1e-9, name


def test_recurrence_is_the_householder_update():
    """S_t = (I - beta k k^T) S_{t-1} + beta k v^T and o_t = S_t^T q_t, written out per token."""
    q, k, v, beta, s0 = _inputs(B=1, H=1, T=6)
    o, s = delta_rule_recurrent(q, k, v, beta, s0)
    S = s0[0, 0]
    for t in range(6):
        kt, b = k[0, 0, t], beta[0, 0, t]
        S = (torch.eye(8, dtype=F64) - b * torch.outer(kt, kt)) @ S + b * torch.outer(kt, v[0, 0, t])
        assert torch.allclose(o[0, 0, t], S.T @ q[0, 0, t], atol=1e-12)
    assert torch.allclose(s[0, 0], S, atol=1e-12)


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
def test_delta_property(form):
    """beta = 1, |k| = 1: writing (k, v) then reading with q = k returns v; writing (k, v2) over it
    returns v2, not v1 + v2; an orthogonal key keeps its own value; beta = 0 writes nothing."""
    run = delta_rule_recurrent if form == "recurrent" else (lambda *a: delta_rule_chunkwise(*a, chunk_size=16))
    e = torch.eye(4, dtype=F64)
    k1, k2 = e[0], e[1]
    v1, v2, v3 = (torch.randn(3, generator=torch.Generator().manual_seed(i), dtype=F64) for i in range(3))
    zero = torch.zeros(3, dtype=F64)
    # t:      0: write (k1, v1)   1: write (k2, v3)   2: read k1   3: write (k1, v2)   4: read k1   5: read k2
    k = torch.stack([k1, k2, k1, k1, k1, k2])
    v = torch.stack([v1, v3, zero, v2, zero, zero])
    beta = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 0.0], dtype=F64)
    o, _ = run(k[None, None], k[None, None], v[None, None], beta[None, None])
    o = o[0, 0]
    for t, want in ((0, v1), (1, v3), (2, v1), (3, v2), (4, v2), (5, v3)):
        assert torch.allclose(o[t], want, atol=1e-12), t


# ----------------------------------------------------------------------------- the mixer in a model
@pytest.mark.parametrize("mixer", [{}, {"use_gate": True, "allow_neg_eigval": True}, {"conv_size": 0}],
                         ids=["default", "gate-negeig", "no-conv"])
def test_streaming_decode_equals_the_full_forward(mixer):
    """Prefill 21 tokens (chunkwise, padded), then decode 5 one at a time through the cache (conv
    window + recurrent state); attention in the other layer decodes through its KV cache."""
    m = _model(mixer, layers={"pattern": "DA", "mixers": {"D": {"kind": "deltanet", "chunk_size": 16, **mixer},
                                                          "A": {"kind": "attention"}}})
    ids = _ids(26)
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        steps = [m(ids[:, :21], cache=cache).logits] + [m(ids[:, t:t + 1], cache=cache).logits for t in range(21, 26)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10
    assert cache.layers[0].state.dtype == F64 and cache.layers[0].state.shape == (2, 4, 8, 8)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
def test_packed_documents_equal_documents_run_one_by_one(form):
    """doc_mask resets the state and the conv window at each boundary; without it they leak."""
    m = _model(doc_mask=True)
    for block in m.blocks:
        block.mixer.form = form
    T = DOCS.shape[1]
    ids = _ids(T)
    with torch.no_grad():
        packed = m(ids, doc_ids=DOCS).logits
        for row in range(2):
            ends = [0] + [t for t in range(1, T) if DOCS[row, t] != DOCS[row, t - 1]] + [T]
            for a, b in zip(ends, ends[1:]):
                alone = m(ids[row:row + 1, a:b]).logits
                assert (packed[row, a:b] - alone[0]).abs().max() < 1e-10, (row, a, b)
        leaky = _model(doc_mask=False)(ids, doc_ids=DOCS).logits
    assert (leaky[0, 5:24] - packed[0, 5:24]).abs().max() > 1e-6


def test_a_two_layer_deltanet_trains():
    torch.manual_seed(0)
    losses = train_losses(models.Decoder(_cfg({"use_gate": True})), _ids(33, B=4))
    assert losses[-1] < 0.7 * losses[0], losses


def test_layer_pieces_tags_kernel_and_flops():
    m = _model({"n_heads": 2, "head_dim": 12, "use_gate": True})
    mixer = m.blocks[0].mixer
    assert (mixer.n_heads, mixer.head_dim) == (2, 12) and mixer.wq.weight.shape == (24, 32)
    assert mixer.conv.weight.shape == (72, 1, 4) and mixer.wb.weight.shape == (2, 32)
    bound = 1 / 2                                     # nn.Conv1d's own init: kaiming-uniform, fan-in K = 4
    assert mixer.conv.weight.abs().max() <= bound and mixer.conv.weight.std() > 0.1
    assert torch.equal(mixer.o_norm.weight, torch.ones(12, dtype=F64))
    assert [row["kernel"] for row in m.layer_summary()] == ["torch_chunk", "torch_chunk"]
    mixer.form = "recurrent"
    assert mixer.kernel == "torch_recurrent"
    assert dn.cu_seqlens(DOCS).tolist() == [0, 5, 24, 37, 40, 56, 72, 80]      # fla's varlen offsets
    cfg = _cfg({"chunk_size": 32})
    h, d, c = 4, 8, 32
    term = 3 * h * (5 * c * d + 6 * d * d) + 18 * 4 * h * d
    assert dn.DeltaNet.flops_per_token(cfg, cfg.layers.mixers["D"], 1024) == term
    assert flops_per_token(models.Decoder(cfg), 64) == flops_per_token(models.Decoder(cfg), 1024)


def test_meta_build_then_init_equals_direct_build():
    """The conv's module-owned init and the norm's gain follow (seed, name) like every parameter."""
    cfg = _cfg({"use_gate": True})
    direct = models.Decoder(cfg, init_seed=5)
    with torch.device("meta"):
        meta = models.Decoder(cfg, init_seed=5)
    meta.to_empty(device="cpu")
    meta.init_weights()
    a, b = direct.state_dict(), meta.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- bad input
def test_bad_input_names_the_key(monkeypatch):
    with pytest.raises(ConfigError) as e:
        _cfg({"chunk_size": 48})
    assert e.value.key == "model.layers.mixers.D.chunk_size" and "16, 32, 64" in str(e.value)
    with pytest.raises(ConfigError) as e:
        models.Decoder(_cfg({"n_heads": 5}))
    assert e.value.key == "model.layers.mixers.D.n_heads" and "does not divide d_model=32" in str(e.value)
    models.Decoder(_cfg({"n_heads": 5, "head_dim": 8}))          # an explicit head dim need not divide
    for key, value in (("conv_size", -1), ("head_dim", 0)):
        with pytest.raises(ConfigError) as e:
            _cfg({key: value})
        assert e.value.key == f"model.layers.mixers.D.{key}"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="need CUDA") as e:
        _cfg({"backend": "fla"})
    assert e.value.key == "model.layers.mixers.D.backend"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(dn, "fla_chunk_delta_rule", lambda: None)
    with pytest.raises(ConfigError, match="flash-linear-attention") as e:
        _cfg({"backend": "fla"})
    assert e.value.key == "model.layers.mixers.D.backend"


# ----------------------------------------------------------------------------- fla (CUDA)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fla's kernel needs CUDA")
@pytest.mark.parametrize("doc_mask", [False, True])
def test_fla_kernel_matches_the_torch_path_at_bf16(doc_mask):
    """The same mixer through fla's chunk kernel (bf16 q/k/v) and the PyTorch chunkwise form (fp32
    state and solve), both under bf16 autocast, forward and backward. Tolerances: fla's own kernel
    tests allow error ratios 0.006 (output) and 0.008 (gradients) against fp32; the mixer adds a
    bf16 cast of q, k, v and bf16 projections, hence 0.01 and 0.02."""
    if dn.fla_chunk_delta_rule() is None:
        pytest.skip("flash-linear-attention (with Triton) is not installed")
    dev = torch.device("cuda")
    cfgs = {b: _cfg({"chunk_size": 64, "backend": b}, d_model=256, n_heads=2, max_seq_len=512, doc_mask=doc_mask)
            for b in ("torch", "fla")}
    torch.manual_seed(0)
    mixers = {b: dn.DeltaNet(c, c.layers.mixers["D"], 0).to(dev) for b, c in cfgs.items()}
    mixers["fla"].load_state_dict(mixers["torch"].state_dict())
    assert mixers["fla"].kernel == "fla_chunk" and mixers["torch"].kernel == "torch_chunk"
    g = torch.Generator(device=dev).manual_seed(0)
    B, T = 2, 300                                    # not a multiple of the chunk
    x0 = torch.randn(B, T, 256, device=dev, generator=g)
    dy = torch.randn(B, T, 256, device=dev, generator=g)
    doc_ids = torch.cat([torch.zeros(B, 70), torch.ones(B, 150), torch.full((B, 80), 2.0)], 1).long().to(dev)
    ctx = MixerContext(start=0, cos=torch.empty(0), sin=torch.empty(0), doc_ids=doc_ids if doc_mask else None)
    out = {}
    for name, mixer in mixers.items():
        x = x0.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = mixer(x, ctx)
        y.float().backward(dy)
        out[name] = (y, x.grad, {n: p.grad for n, p in mixer.named_parameters()})
    (y_t, dx_t, dp_t), (y_f, dx_f, dp_f) = out["torch"], out["fla"]
    assert err_ratio(y_f, y_t) < 0.01
    assert err_ratio(dx_f, dx_t) < 0.02
    for n in dp_t:
        assert err_ratio(dp_f[n], dp_t[n]) < 0.02, n
