"""The model contracts every technique plugs into: slot protocols checked at registration,
module-owned init, loss terms and statistics returned by slot modules, activation
checkpointing applied from outside (terms counted once), and blocks that compile without
graph breaks."""
from __future__ import annotations

import math

import pytest
import torch
from test_models.doubles import DoubleMixer, registered
from torch import nn

import models
from models import registry
from models.config import model_config
from models.context import LossTerm, MixerContext, ModelOutput
from models.registry import Registry
from train.parallel import apply_activation_checkpointing

BASE = {"d_model": 32, "n_layers": 3, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32}
DOUBLE = {"layers": {"pattern": "DA", "mixers": {"D": {"kind": "test_double"}, "A": {"kind": "attention"}}}}


def _ids(B: int = 2, T: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(3))


def _double_model(**over) -> models.Decoder:
    torch.manual_seed(0)
    return models.Decoder(model_config({**BASE, **DOUBLE, **over})).double()


# ----------------------------------------------------------------------------- protocols
@pytest.mark.parametrize("reg, broken, missing", [
    (registry.MIXERS, type("NoCache", (nn.Module,), {"forward": lambda s, x, c, k=None: x,
                                                   "flops_per_token": staticmethod(lambda *a: 0.0)}), "new_cache"),
    (registry.FFNS, type("NoWidth", (nn.Module,), {"forward": lambda s, x, c=None: x,
                                                  "check_activation": staticmethod(lambda n, k: None)}),
     "hidden_width"),
    (registry.NORMS, type("NoReset", (nn.Module,), {"forward": lambda s, x: x}), "reset_parameters"),
    (registry.PARAMETERIZATIONS, type("NoOutMult", (), {"residual_multiplier": 1.0, "input_multiplier": 1.0,
                                                        "init_std": lambda s, spec, r=False: 0.02,
                                                        "group_rule": lambda s, spec: None}),
     "output_multiplier"),
    (registry.MEMORIES, type("NoForward", (), {}), "forward"),
])
def test_registering_a_class_that_lacks_a_member_raises(reg, broken, missing):
    scratch = Registry(reg.slot, reg.protocol)        # a scratch registry: the real one stays clean
    with pytest.raises(TypeError, match=rf"{broken.__name__}.*missing.*{missing}"):
        scratch.register("broken")(broken)
    assert "broken" not in scratch


def test_every_registered_entry_satisfies_its_protocol():
    from models.protocols import check_protocol
    for reg in (registry.MIXERS, registry.FFNS, registry.ACTIVATIONS, registry.NORMS,
                registry.PARAMETERIZATIONS, registry.MEMORIES):
        for name in reg.names():
            check_protocol(reg.get(name), reg.protocol, f"{reg.slot} {name}")


# ----------------------------------------------------------------------------- init
def test_module_owned_parameters_keep_their_modules_init():
    with registered():
        m = _double_model()
    mixer = m.blocks[0].mixer
    assert isinstance(mixer, DoubleMixer)
    assert torch.equal(mixer.ln.weight, torch.ones_like(mixer.ln.weight))       # stock LayerNorm: ones
    assert torch.equal(mixer.ln.bias, torch.zeros_like(mixer.ln.bias))          # ... and zeros
    w = mixer.conv.weight                            # depthwise conv: kaiming-uniform, bound 1/sqrt(K)
    bound = 1 / math.sqrt(w.shape[1] * w.shape[2])
    assert w.abs().max() <= bound and w.std() > 0.5 * bound / math.sqrt(3)      # not normal(0.02)
    assert torch.equal(mixer.gain, torch.full_like(mixer.gain, 0.5))            # the mixer's own rule
    assert abs(float(mixer.wq.weight.detach().std()) - 0.02) < 0.004                     # matrices: the std
    assert torch.equal(m.final_norm.weight, torch.ones_like(m.final_norm.weight))


def test_module_init_without_reset_parameters_is_an_error():
    m = models.Decoder(model_config(BASE))

    class Bare(nn.Module):
        param_tags = {"s": "scalar"}                  # scalar: init by its module

        def __init__(self):
            super().__init__()
            self.s = nn.Parameter(torch.ones(()))

    m.blocks[0].extra = Bare()
    with pytest.raises(TypeError, match=r"Bare \(blocks\.0\.extra\).*blocks\.0\.extra\.s.*reset_parameters"):
        m.reset_parameters()


# ----------------------------------------------------------------------------- output
def test_output_has_named_terms_and_no_logits_with_labels():
    m = models.Decoder(model_config(BASE)).double()
    x = _ids()
    out = m(x, labels=x, z_loss=1e-3)
    assert isinstance(out, ModelOutput) and out.logits is None and out.stats == {}
    assert set(out.losses) == {"ce", "z"}
    assert all(isinstance(t, LossTerm) and t.reduction == "sum" and t.value.dim() == 0 for t in out.losses.values())
    logits = m(x).logits
    lse = torch.logsumexp(logits, -1)
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten(), reduction="sum")
    torch.testing.assert_close(out.losses["ce"].value, ref, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.losses["z"].value, 1e-3 * (lse ** 2).sum(), rtol=1e-13, atol=0)
    both = m(x, labels=x, return_logits=True)
    torch.testing.assert_close(both.logits, logits, rtol=0, atol=0)


def test_decoder_adds_same_named_terms_across_layers_and_collects_stats():
    with registered():
        m = _double_model(n_layers=4)                 # pattern DA: layers 0 and 2 return test_aux
        x = _ids()
        seen = []
        hooks = [b.mixer.register_forward_hook(lambda mod, i, o: seen.append(o[1].losses["test_aux"].value))
                 for b in m.blocks if isinstance(b.mixer, DoubleMixer)]
        out = m(x, labels=x, want_stats=True)
        for h in hooks:
            h.remove()
        assert len(seen) == 2
        assert out.losses["test_aux"].reduction == "mean"
        torch.testing.assert_close(out.losses["test_aux"].value, seen[0] + seen[1], rtol=1e-15, atol=0)
        assert set(out.stats["test_rms"]) == {0, 2}
        assert set(out.stats) == {"test_rms", "attn_entropy", "attn_entropy_max"}      # attention's probe
        assert set(out.stats["attn_entropy"]) == {1, 3}
        assert not out.stats["test_rms"][0].requires_grad
        assert m(x, labels=x).stats == {}                        # only when asked


def test_model_output_is_a_pytree_node():
    import torch.utils._pytree as pytree
    out = ModelOutput(logits=torch.ones(2), losses={"ce": LossTerm(torch.zeros(()), "sum")})
    leaves, _ = pytree.tree_flatten(out)
    assert sum(isinstance(t, torch.Tensor) for t in leaves) == 2


# ----------------------------------------------------------------------------- AC and compile
def test_activation_checkpointing_from_outside_recomputes_and_counts_terms_once():
    with registered():
        x = _ids()
        plain, ac = _double_model(n_layers=4), _double_model(n_layers=4)
        apply_activation_checkpointing(ac, every=2)              # blocks 0 and 2 (both DoubleMixer)
        results = []
        for model in (plain, ac):
            DoubleMixer.forwards.clear()
            out = model(x, labels=x)
            total = out.losses["ce"].value / x.numel() + out.losses["test_aux"].value
            total.backward()
            results.append((dict(DoubleMixer.forwards), {k: t.value.detach() for k, t in out.losses.items()},
                            {n.replace("._checkpoint_wrapped_module", ""): p.grad for n, p in model.named_parameters()}))
        (f_plain, l_plain, g_plain), (f_ac, l_ac, g_ac) = results
        assert f_plain == {0: 1, 2: 1}
        assert f_ac == {0: 2, 2: 2}                               # checkpointed: forward again in backward
        assert l_ac.keys() == l_plain.keys()
        for k in l_plain:
            torch.testing.assert_close(l_ac[k], l_plain[k], rtol=0, atol=0)
        assert g_ac.keys() == g_plain.keys()
        for k in g_plain:
            torch.testing.assert_close(g_ac[k], g_plain[k], rtol=1e-13, atol=1e-16)
        assert set(ac.state_dict()) == set(plain.state_dict())   # checkpoints keep the plain keys


def test_counts_forwards_of_unwrapped_blocks_once():
    with registered():
        m = _double_model(n_layers=4, layers={"pattern": "D", "mixers": {"D": {"kind": "test_double"}}})
        apply_activation_checkpointing(m, every=2)
        x = _ids()
        m(x, labels=x).losses["ce"].value.backward()
        assert DoubleMixer.forwards == {0: 2, 1: 1, 2: 2, 3: 1}


@pytest.mark.parametrize("over", [{}, DOUBLE, {"ffn": {"kind": "mlp", "activation": "stochastic"}}],
                         ids=["attention-swiglu", "double-mixer-aux", "stochastic"])
def test_block_compiles_without_graph_breaks(over):
    with registered():
        torch.manual_seed(0)
        m = models.Decoder(model_config({**BASE, **over}))
    block = m.blocks[0]
    x = torch.randn(2, 8, 32)
    cos, sin = m.rope(0, 8)
    ctx = MixerContext(start=0, cos=cos.float(), sin=sin.float(), sample_index=torch.arange(2), want_stats=True)
    eager_h, eager_aux = block(x, ctx)
    torch._dynamo.reset()
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    h, aux = compiled(x, ctx)
    torch.testing.assert_close(h, eager_h, rtol=1e-6, atol=1e-6)
    assert aux.losses.keys() == eager_aux.losses.keys() and aux.stats.keys() == eager_aux.stats.keys()
