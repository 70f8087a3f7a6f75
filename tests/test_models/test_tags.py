"""Every parameter of every buildable decoder carries a registered tag; untagged parameters and
unregistered tags fail loudly, naming the module and the parameter.

The factors come from the registries, so techniques registered later are covered automatically;
one factor at a time plus a few pairs keeps the count linear in the registries, not a product.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import registry
from models.config import model_config
from models.registry import ConfigError
from models.tags import TagSpec, param_tags, register_tag, tag_spec

from test_models.doubles import registered

BASE = {"d_model": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 67, "max_seq_len": 32}


def ffn_variants() -> list[tuple[str, str]]:
    """(ffn kind, activation) for every activation each registered FFN kind accepts."""
    from models.ffn import GLU_GATES

    candidates = sorted(set(registry.ACTIVATIONS.names()) | set(GLU_GATES))
    out = []
    for kind in registry.FFNS.names():
        cls = registry.FFNS.get(kind)
        valid = []
        for act in candidates:
            try:
                cls.check_activation(act, "model.ffn.activation")
            except ConfigError:
                continue
            valid.append(act)
        assert valid, f"ffn kind {kind!r} accepts no registered activation"
        out += [(kind, act) for act in valid]
    return out


def test_ffn_variant_lists_cover_registry():
    variants = ffn_variants()
    mlp_acts = {a for k, a in variants if k == "mlp"}
    glu_acts = {a for k, a in variants if k == "glu"}
    from models.ffn import GLU_GATES

    assert mlp_acts == set(registry.ACTIVATIONS.names())
    assert glu_acts == set(GLU_GATES)


def _check_all_tagged(model: nn.Module, label: str) -> dict[str, str]:
    tags = param_tags(model)
    names = {n for n, _ in model.named_parameters()}
    assert set(tags) == names, f"{label}: tags {sorted(set(tags) ^ names)}"
    for name, tag in tags.items():
        assert isinstance(tag, str) and tag, f"{label}: {name} has tag {tag!r}"
    return tags


def _model(**over) -> models.Decoder:
    return models.Decoder(model_config(dict(BASE, **over)))


def _factors() -> list[tuple[str, dict]]:
    """One factor at a time off the base config: every registered mixer, FFN variant, norm
    (block and final), parameterization, tying, QK-norm and bias, each alone."""
    out = [(f"mixer={m}", {"layers": {"pattern": "M", "mixers": {"M": {"kind": m}}}})
           for m in registry.MIXERS.names()]
    out += [(f"ffn={k}/{a}", {"ffn": {"kind": k, "activation": a}}) for k, a in ffn_variants()]
    out += [(f"norm.block={n}", {"norm": {"block": n}}) for n in registry.NORMS.names()]
    out += [(f"norm.final={n}", {"norm": {"final": n}}) for n in registry.NORMS.names()]
    out += [(f"param={k}", {"param": {"kind": k}}) for k in registry.PARAMETERIZATIONS.names()]
    out += [("untied", {"tie_embeddings": False}), ("qk_norm", {"qk_norm": True}),
            ("bias", {"ffn": {"bias": True}})]
    return out


# A few pairs where two slots meet in one module or one init rule.
PAIRS = [
    ("layernorm+qk_norm+untied", {"norm": {"block": "layernorm", "final": "layernorm"}, "qk_norm": True,
                                 "tie_embeddings": False}),
    ("polynorm+bias+none-norm", {"ffn": {"kind": "mlp", "activation": "polynorm", "bias": True},
                                 "norm": {"block": "none", "final": "none"}}),
    ("stochastic-glu+layernorm", {"ffn": {"kind": "glu", "activation": "stochastic"},
                                  "norm": {"block": "layernorm"}}),
]


@pytest.mark.parametrize("label, over", _factors() + PAIRS, ids=[f[0] for f in _factors() + PAIRS])
def test_every_factor_is_tagged(label, over):
    model = _model(**over)
    tags = _check_all_tagged(model, label)
    assert tags["embed.weight"] == "embedding", label
    if over.get("tie_embeddings") is False:
        assert tags["head.weight"] == "output_head", label
    else:
        assert not any(n.startswith("head.") for n in tags), label


@pytest.mark.parametrize("kind", registry.PARAMETERIZATIONS.names())
def test_every_parameterization_is_tagged(kind):
    _check_all_tagged(_model(param={"kind": kind}), f"param={kind}")


def test_memory_layers_are_tagged():
    """Every registered memory layer, and a registered test double (so the loop is never empty)."""
    with registered(mixer=False, memory=True):
        kinds = registry.MEMORIES.names()
        assert "test_memory" in kinds
        for kind in kinds:
            small = {"heads": 2, "k_dim": 16, "n_keys": 8, "knn": 4}       # sizes only matter to product_key
            for shared in (False, True):
                tags = _check_all_tagged(_model(memory={"layers": [1], "kind": kind, "share_values": shared,
                                                        **small}), f"memory={kind} shared={shared}")
                if kind == "test_memory":
                    assert tags["blocks.1.ffn.values"] == "memory_value"
                if kind == "product_key":
                    values = "shared.memory.weight" if shared else "blocks.1.ffn.values.weight"
                    assert tags[values] == "memory_value" and tags["blocks.1.ffn.keys"] == "memory_key"


def test_known_tags_of_baseline():
    model = models.Decoder(model_config(dict(BASE, tie_embeddings=False, qk_norm=True,
                                             norm={"block": "layernorm", "final": "layernorm"},
                                             ffn={"kind": "glu", "activation": "swiglu", "bias": True})))
    tags = param_tags(model)
    assert tags["embed.weight"] == "embedding"
    assert tags["head.weight"] == "output_head"
    for w in ("wq", "wk", "wv", "wo"):
        assert tags[f"blocks.0.mixer.{w}.weight"] == "hidden_matrix"
    assert tags["blocks.1.ffn.w_in.weight"] == "hidden_matrix"
    assert tags["blocks.1.ffn.w_in.bias"] == "hidden_bias"
    assert tags["blocks.1.ffn.w2.bias"] == "hidden_bias"
    assert tags["blocks.0.mixer.q_norm.weight"] == "norm_gain"
    assert tags["blocks.0.mixer_norm.weight"] == "norm_gain"
    assert tags["blocks.0.ffn_norm.bias"] == "norm_bias"
    assert tags["final_norm.weight"] == "final_norm_gain"       # its own tags: CompleteP treats it apart
    assert tags["final_norm.bias"] == "final_norm_bias"


def test_tied_weight_tagged_once_as_embedding():
    model = models.Decoder(model_config(dict(BASE, tie_embeddings=True)))
    tags = param_tags(model)
    assert tags["embed.weight"] == "embedding"
    assert "output_head" not in tags.values()


# ----------------------------------------------------------------------------- untagged params
class Untagged(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(3))


class PartlyTagged(nn.Module):
    param_tags = {"a": "scalar"}

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.ones(()))
        self.b = nn.Parameter(torch.ones(2))


def test_untagged_parameter_raises():
    with pytest.raises(KeyError, match="scale"):
        param_tags(Untagged())


def test_partly_tagged_module_raises_for_the_missing_one():
    with pytest.raises(KeyError, match="'b'"):
        param_tags(PartlyTagged())
    ok = PartlyTagged()
    ok.param_tags = {"a": "scalar", "b": "hidden_bias"}   # instance attribute wins
    assert param_tags(ok) == {"a": "scalar", "b": "hidden_bias"}


def test_untagged_parameter_inside_decoder_raises_with_full_name():
    model = models.Decoder(model_config(dict(BASE)))
    model.blocks[1].extra = Untagged()
    with pytest.raises(KeyError, match=r"blocks\.1\.extra\.scale"):
        param_tags(model)


def test_stock_linear_without_tags_raises():
    model = models.Decoder(model_config(dict(BASE)))
    model.blocks[0].mixer.gate = nn.Linear(4, 4)
    with pytest.raises(KeyError, match=r"blocks\.0\.mixer\.gate\.weight"):
        param_tags(model)


def test_unregistered_tag_fails_at_build_time_naming_module_and_parameter():
    class Mistagged(nn.Module):
        param_tags = {"w": "no_such_tag"}

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

    model = models.Decoder(model_config(dict(BASE)))
    model.blocks[0].mixer.extra = Mistagged()
    with pytest.raises(KeyError, match=r"blocks\.0\.mixer\.extra\.w.*Mistagged.*no_such_tag.*not registered"):
        param_tags(model)
    with pytest.raises(KeyError, match="no_such_tag"):
        models.Decoder.reset_parameters(model)              # init reads the specs too


def test_tag_registration_refuses_a_conflicting_spec():
    spec = tag_spec("hidden_matrix")
    assert register_tag(spec) is spec                      # the same spec again is fine (re-import)
    with pytest.raises(ValueError, match="already registered"):
        register_tag(TagSpec("hidden_matrix", matrix=False, in_block=True, matmul=False, muon_ok=False))
