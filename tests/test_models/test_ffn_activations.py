"""Every registered activation and FFN variant: gradcheck (float64), 20 training steps of a
2-layer model without non-finite values, and forward/backward with every registered mixer,
norm and parameterization. The variant list comes from the registries, so activations added
later are covered automatically."""
from __future__ import annotations

import pytest
import torch

import models
from models import registry
from models.activations import build_activation
from models.config import model_config
from models.ffn import GLU_GATES
from models.context import MixerContext
from models.registry import ConfigError

V = 53


def ffn_variants() -> list[tuple[str, str]]:
    """(ffn kind, activation) for every activation each registered FFN kind accepts."""
    candidates = sorted(set(registry.ACTIVATIONS.names()) | set(GLU_GATES))
    out = []
    for kind in registry.FFNS.names():
        for act in candidates:
            try:
                registry.FFNS.get(kind).check_activation(act, "model.ffn.activation")
            except ConfigError:
                continue
            out.append((kind, act))
    return out


VARIANTS = ffn_variants()
ISSUE_ACTIVATIONS = {"relu", "gelu", "gelu_tanh", "silu", "relu2", "polyrelu", "polynorm", "stochastic", "identity"}


def test_issue_activations_and_variants_are_registered():
    assert ISSUE_ACTIVATIONS <= {a for k, a in VARIANTS if k == "mlp"}
    assert {"glu", "bilinear", "reglu", "geglu", "swiglu", "stochastic"} == {a for k, a in VARIANTS if k == "glu"}
    assert ("fused_linear", "identity") in VARIANTS


@pytest.mark.parametrize("name", registry.ACTIVATIONS.names())
def test_gradcheck_every_activation(name):
    torch.manual_seed(0)
    act = build_activation(name, 8).double()
    with torch.no_grad():                      # move parametric activations off their init point
        for p in act.parameters():
            p.add_(0.1 * torch.randn_like(p))
    u = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    u = u + 0.05 * torch.sign(u)               # keep ReLU kinks away from the finite-difference step
    u.requires_grad_(True)
    ctx = MixerContext(start=0, cos=torch.zeros(1), sin=torch.zeros(1), sample_index=torch.tensor([3, 9]))
    names = [n for n, _ in act.named_parameters()]
    args = (u, ctx) if getattr(act, "takes_context", False) else (u,)

    def fn(u, *ps):                            # w.r.t. the input and the activation's own scalars
        return torch.func.functional_call(act, dict(zip(names, ps)), (u, *args[1:]))

    inputs = (u, *[p.detach().clone().requires_grad_(True) for p in act.parameters()])
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


def tiny_model(kind: str, act: str, **over) -> models.Decoder:
    data = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": V, "max_seq_len": 32,
            "ffn": {"kind": kind, "activation": act}}
    data.update(over)
    torch.manual_seed(0)
    return models.Decoder(model_config(data))


@pytest.mark.parametrize("kind, act", VARIANTS, ids=[f"{k}-{a}" for k, a in VARIANTS])
def test_every_variant_trains_20_steps_finite(kind, act):
    model = tiny_model(kind, act)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, V, (4, 17), generator=torch.Generator().manual_seed(0))   # one batch, memorised
    first = last = None
    for step in range(20):
        idx = torch.arange(4 * step, 4 * step + 4)
        logits = model(x[:, :-1], sample_index=idx).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
        assert torch.isfinite(loss), (kind, act, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), (kind, act, step, n)
        opt.step()
        first = loss.item() if first is None else first
        last = loss.item()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert last < first                         # it learns (the batch is fixed)


@pytest.mark.parametrize("kind, act", VARIANTS, ids=[f"{k}-{a}" for k, a in VARIANTS])
def test_every_variant_with_every_mixer_norm_and_parameterization(kind, act):
    """One axis at a time (linear in the registries' sizes): forward + backward stay finite."""
    combos = [{"layers": {"pattern": "M", "mixers": {"M": {"kind": mixer}}}} for mixer in registry.MIXERS.names()]
    combos += [{"norm": {"block": n, "final": n}} for n in registry.NORMS.names()]
    combos += [{"param": {"kind": p}} for p in registry.PARAMETERIZATIONS.names()]
    x = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(0))
    for over in combos:
        model = tiny_model(kind, act, **over)
        logits = model(x, sample_index=torch.tensor([5, 6])).logits
        logits.float().square().mean().backward()
        assert torch.isfinite(logits).all(), over
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), over
