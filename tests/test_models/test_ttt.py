"""TTT-Linear and TTT-MLP ("Learning to (Learn at Test Time)", arXiv 2407.04620): the dual form
against the primal form, the primal form against an explicit inner loop differentiated by
torch.func.grad, base LR 0 as a fixed function, streaming decode, training, checkpointing, the
base-LR warm-up, tags, FLOPs and bad input. float64 references on CPU."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ablate_testing import train_losses

import models
from models.config import model_config
from models.flops import flops_per_token
from models.mixers import ttt
from models.mixers.ttt_inner import ln_fwd, mini_batch_eta, scan
from models.registry import ConfigError
from models.tags import param_tags

F64 = torch.float64
KINDS = ["ttt_linear", "ttt_mlp"]


def _inner(kind: str, B: int = 2, H: int = 2, T: int = 64, b: int = 16, d: int = 16, seed: int = 0):
    """A non-trivial float64 state, q/k/v (B, H, n, b, d), per-token LRs and token steps."""
    g = torch.Generator().manual_seed(seed)
    hid = 4 * d if kind == "ttt_mlp" else d
    shapes = [(d, hid), (1, hid)] + ([(hid, d), (1, d)] if kind == "ttt_mlp" else [])
    state = tuple(0.3 * torch.randn(B, H, *s, generator=g, dtype=F64) for s in shapes)
    q, k, v = (torch.randn(B, H, T // b, b, d, generator=g, dtype=F64) for _ in range(3))
    lr = 0.5 * torch.rand(B, H, T // b, b, generator=g, dtype=F64)
    token_eta = (1.0 / torch.arange(1, b + 1, dtype=F64) + 0.1 * torch.randn(b, generator=g, dtype=F64)).clamp_min(0)
    gamma = 1 + 0.2 * torch.randn(H, 1, d, generator=g, dtype=F64)
    beta = 0.2 * torch.randn(H, 1, d, generator=g, dtype=F64)
    return state, q, k, v, lr, token_eta, gamma, beta


def _cfg(kind: str = "ttt_linear", mixer: dict | None = None, **over) -> models.ModelConfig:
    data = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 64,
            "layers": {"pattern": "T", "mixers": {"T": {"kind": kind, "mini_batch_size": 8, **(mixer or {})}}}}
    return model_config({**data, **over})


def _model(kind: str = "ttt_linear", mixer: dict | None = None, **over) -> models.Decoder:
    torch.manual_seed(0)
    return models.Decoder(_cfg(kind, mixer, **over)).double()


def _ids(T: int, B: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- the inner loop
@pytest.mark.parametrize("kind", KINDS)
def test_dual_equals_primal(kind):
    """Section 6 test 1: B=2, H=2, T=64, b=16, d=16; outputs and final states at 1e-10."""
    state, *rest = _inner(kind)
    z_d, s_d = scan(state, *rest, form="dual")
    z_p, s_p = scan(state, *rest, form="primal")
    assert (z_d - z_p).abs().max() < 1e-10
    assert all((a - b).abs().max() < 1e-10 for a, b in zip(s_d, s_p))
    assert (s_d[0] - state[0]).abs().max() > 1e-3                      # the state did move


def _g(params: tuple[torch.Tensor, ...], z: torch.Tensor) -> torch.Tensor:
    if len(params) == 2:
        return z @ params[0] + params[1][0]
    return F.gelu(z @ params[0] + params[1][0], approximate="tanh") @ params[2] + params[3][0]


@pytest.mark.parametrize("kind", KINDS)
def test_primal_equals_an_explicit_autograd_inner_loop(kind):
    """Per head and mini-batch: every token's gradient of 1/2 ||LN(g(k; W_0)) - (v - k)||^2 by
    torch.func.grad at the mini-batch's W_0, W_t = W_0 - sum_{s<=t} eta[t,s] grad_s, out_t = g(q_t; W_t)."""
    state, q, k, v, lr, token_eta, gamma, beta = _inner(kind, B=1, H=2, T=24, b=8, d=6)
    z, final = scan(state, q, k, v, lr, token_eta, gamma, beta, form="primal")
    for h in range(2):
        W = tuple(s[0, h] for s in state)

        def loss(params, kt, vt):
            return 0.5 * (ln_fwd(_g(params, kt), gamma[h, 0], beta[h, 0]) - (vt - kt)).pow(2).sum()

        grad = torch.func.grad(loss)
        for n in range(3):
            grads = [grad(W, k[0, h, n, s], v[0, h, n, s]) for s in range(8)]
            eta = mini_batch_eta(lr[0, h, n], token_eta)
            for t in range(8):
                Wt = tuple(w - sum(eta[t, s] * gs[i] for s, gs in enumerate(grads[:t + 1])) for i, w in enumerate(W))
                assert (_g(Wt, q[0, h, n, t]) - z[0, h, n, t]).abs().max() < 1e-10, (h, n, t)
            W = Wt
        assert all((w - f[0, h]).abs().max() < 1e-10 for w, f in zip(W, final))


@pytest.mark.parametrize("kind", KINDS)
def test_base_lr_zero_is_a_fixed_function(kind):
    """Section 6 test 4: eta = 0 leaves out = W_o LayerNorm(q + LN(g(q; W_0))) per token."""
    m = _model(kind, {"base_lr": 0.0, "base_lr_warmup_steps": 0}, n_layers=1)
    mixer = m.blocks[0].mixer
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 20, 32, generator=g, dtype=F64)
    y = mixer(x, None)
    cos, sin = ttt.rope_mod_b(0, 20, 8, 8, m.cfg.rope_theta, "cpu")
    q = ttt.apply_rope(mixer.wq(x).view(2, 20, 4, 8), cos, sin).transpose(1, 2)
    inner = mixer.inner
    params = tuple(getattr(inner, n) for n in (("W1", "b1", "W2", "b2") if kind == "ttt_mlp" else ("W1", "b1")))
    out = torch.stack([_g(tuple(p[h] for p in params), q[:, h]) for h in range(4)], 1)
    out = q + ln_fwd(out, inner.ln_weight[:, None], inner.ln_bias[:, None])
    want = mixer.wo(mixer.post_norm(out.transpose(1, 2).reshape(2, 20, 32)))
    assert (y - want).abs().max() < 1e-12


# ----------------------------------------------------------------------------- the mixer in a model
@pytest.mark.parametrize("kind,mixer", [("ttt_linear", {}), ("ttt_mlp", {}),
                                        ("ttt_linear", {"use_gate": True, "pre_conv": True, "share_qk": True})],
                         ids=["linear", "mlp", "linear-gate-conv-shareqk"])
def test_streaming_decode_equals_the_full_forward(kind, mixer):
    """Prefill 13 tokens (one mini-batch of 8 + a remainder of 5), a chunk of 6 through the cache
    (finishing the partial mini-batch and starting the next), then 7 tokens one at a time; also
    the full forward in the primal form. Attention in the other layer decodes through its KV cache."""
    m = _model(kind, mixer, layers={"pattern": "TA", "mixers": {"T": {"kind": kind, "mini_batch_size": 8, **mixer},
                                                                "A": {"kind": "attention"}}})
    ids = _ids(26)
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache()
        steps = [m(ids[:, :13], cache=cache).logits, m(ids[:, 13:19], cache=cache).logits]
        steps += [m(ids[:, t:t + 1], cache=cache).logits for t in range(19, 26)]
        m.blocks[0].mixer.form = "primal"
        primal = m(ids).logits
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-10
    assert (primal - full).abs().max() < 1e-10
    layer = cache.layers[0]
    assert layer.pos == 26 and layer.partial[0].shape[2] == 2 and layer.state[0].dtype == F64


@pytest.mark.parametrize("kind", KINDS)
def test_a_two_layer_model_trains(kind):
    torch.manual_seed(0)
    losses = train_losses(models.Decoder(_cfg(kind, {"use_gate": True})), _ids(33, B=4))
    assert losses[-1] < 0.8 * losses[0], losses


def test_bf16_autocast_keeps_the_inner_state_fp32():
    m = models.Decoder(_cfg("ttt_mlp"))
    cache = m.new_cache()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(_ids(12), cache=cache).logits
    assert torch.isfinite(out).all()
    assert all(t.dtype == torch.float32 for t in cache.layers[0].state + cache.layers[0].partial)


@pytest.mark.parametrize("kind", KINDS)
def test_scan_and_block_checkpointing_keep_loss_and_gradients(kind):
    """scan_checkpoint_group on / off x block-level activation checkpointing on / off."""
    from train.parallel import apply_activation_checkpointing
    ids = _ids(29)                      # 3 full mini-batches and a remainder
    results = []
    for group in (0, 2):
        for block_ac in (False, True):
            m = _model(kind, {"scan_checkpoint_group": group})
            if block_ac:
                apply_activation_checkpointing(m)
            loss = m(ids[:, :-1], labels=ids[:, 1:]).losses["ce"].value
            loss.backward()
            grads = {n.replace("_checkpoint_wrapped_module.", ""): p.grad for n, p in m.named_parameters()}
            results.append((loss.detach(), grads))
    base_loss, base = results[0]
    for loss, grads in results[1:]:
        assert (loss - base_loss).abs() < 1e-12 and grads.keys() == base.keys()
        assert all((grads[n] - base[n]).abs().max() < 1e-12 for n in base)


# ----------------------------------------------------------------------------- the base-LR warm-up
def test_mlp_base_lr_warms_up_with_the_trainer_step():
    """TTT-MLP: base_lr 0.1 from 0.01 over 480 steps, set from the step (so a resume agrees)."""
    from train.callbacks.ttt_schedule import TTTSchedule, apply_ttt_schedule
    m = models.Decoder(_cfg("ttt_mlp"))
    mixer = m.blocks[0].mixer
    assert mixer.base_lr_now == 0.01                  # a fresh model is at step 0
    for step, want in ((0, 0.01), (240, 0.055), (480, 0.1), (10_000, 0.1)):
        apply_ttt_schedule(m, step)
        assert abs(mixer.base_lr_now - want) < 1e-12, step
    cfg = types_cfg(m.cfg)
    assert isinstance(ttt_factory()(cfg), TTTSchedule)
    lin = types_cfg(_cfg("ttt_linear"))
    assert ttt_factory()(lin) is None                                  # no warm-up configured


def types_cfg(model_cfg):
    from types import SimpleNamespace
    return SimpleNamespace(model=model_cfg)


def ttt_factory():
    from train.callbacks import CALLBACKS, _import_all
    _import_all()
    return CALLBACKS["ttt_schedule"]


# ----------------------------------------------------------------------------- pieces and bad input
def test_tags_kernel_flops_and_meta_init():
    cfg = _cfg("ttt_mlp", {"use_gate": True, "pre_conv": True, "share_qk": True})
    m = models.Decoder(cfg, init_seed=5)
    tags = param_tags(m)
    inner = {n.split(".")[-1]: t for n, t in tags.items() if ".inner." in n and n.startswith("blocks.0.")}
    assert inner == {"W1": "ttt_inner_weight", "b1": "ttt_inner_bias", "W2": "ttt_inner_weight",
                     "b2": "ttt_inner_bias", "ln_weight": "ttt_norm_gain", "ln_bias": "ttt_norm_bias",
                     "lr_weight": "ttt_lr_weight", "lr_bias": "ttt_lr_bias", "token_offset": "ttt_token_offset"}
    mixer = m.blocks[0].mixer
    assert abs(mixer.inner.W1.std().item() - 0.02) < 0.003 and abs(mixer.inner.lr_weight.std().item() - 0.02) < 0.005
    assert mixer.inner.W1.shape == (4, 8, 32) and mixer.inner.W2.shape == (4, 32, 8)
    assert [row["kernel"] for row in m.layer_summary()] == ["torch_dual", "torch_dual"]
    with torch.device("meta"):
        meta = models.Decoder(cfg, init_seed=5)
    meta.to_empty(device="cpu")
    meta.init_weights()
    a, b = m.state_dict(), meta.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    h, d, bs = 4, 8, 8
    lin = _cfg("ttt_linear")
    assert ttt.TTTLinear.flops_per_token(lin, lin.layers.mixers["T"], 64) == 3 * h * (6 * d * d + 3 * bs * d)
    mlp = cfg.layers.mixers["T"]
    assert ttt.TTTMLP.flops_per_token(cfg, mlp, 64) == 3 * (h * (56 * d * d + 15 * bs * d) + 2 * 4 * 3 * 32)
    assert flops_per_token(models.Decoder(lin), 16) == flops_per_token(models.Decoder(lin), 64)


def test_bad_input_names_the_key():
    key = "model.layers.mixers.T"
    for mixer, name, match in (({"n_heads": 3}, "n_heads", "divide"), ({"n_heads": 32}, "n_heads", "even"),
                               ({"mini_batch_size": 128}, "mini_batch_size", "max_seq_len")):
        with pytest.raises(ConfigError, match=match) as e:
            models.Decoder(_cfg("ttt_linear", mixer))
        assert e.value.key == f"{key}.{name}"
    for mixer, name in (({"mini_batch_size": 0}, "mini_batch_size"), ({"pre_conv": True, "conv_size": 9}, "conv_size"),
                        ({"share_qk": True, "conv_size": 1}, "conv_size"), ({"base_lr": -1.0}, "base_lr")):
        with pytest.raises(ConfigError) as e:
            _cfg("ttt_mlp", mixer)
        assert e.value.key == f"{key}.{name}"
    with pytest.raises(ConfigError, match="does not reset") as e:
        models.Decoder(_cfg("ttt_linear", doc_mask=True))
    assert e.value.key == "model.doc_mask"
