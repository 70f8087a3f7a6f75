"""Every parameter of every buildable decoder carries a tag; untagged parameters fail loudly.

The combinations come from the registries, so techniques registered later are covered
automatically.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import models
from models import registry
from models.config import model_config
from models.registry import ConfigError
from models.tags import param_tags

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


@pytest.mark.parametrize("mixer", registry.MIXERS.names())
def test_every_combination_is_tagged(mixer):
    """mixer x (ffn kind, activation) x block norm x final norm x tying x qk_norm, all tagged."""
    norms = registry.NORMS.names()
    built = 0
    for (kind, act), block_norm, final_norm, tied in itertools.product(
            ffn_variants(), norms, norms, (True, False)):
        data = dict(BASE, tie_embeddings=tied, qk_norm=(built % 2 == 0),
                    layers={"pattern": "M", "mixers": {"M": {"kind": mixer}}},
                    ffn={"kind": kind, "activation": act, "bias": (built % 3 == 0)},
                    norm={"block": block_norm, "final": final_norm})
        label = f"mixer={mixer} ffn={kind}/{act} norm={block_norm}/{final_norm} tied={tied}"
        model = models.Decoder(model_config(data))
        tags = _check_all_tagged(model, label)
        assert tags["embed.weight"] == "embedding", label
        if not tied:
            assert tags["head.weight"] == "output_head", label
        else:
            assert not any(n.startswith("head.") for n in tags), label
        built += 1
    assert built > 0


@pytest.mark.parametrize("kind", registry.PARAMETERIZATIONS.names())
def test_every_parameterization_is_tagged(kind):
    model = models.Decoder(model_config(dict(BASE, param={"kind": kind})))
    _check_all_tagged(model, f"param={kind}")


def test_every_memory_layer_is_tagged():
    for kind in registry.MEMORIES.names():
        model = models.Decoder(model_config(dict(BASE, memory={"layers": [1], "kind": kind})))
        _check_all_tagged(model, f"memory={kind}")


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
    assert tags["final_norm.weight"] == "norm_gain"
    assert tags["final_norm.bias"] == "norm_bias"


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
