"""Meta-device build and name-seeded init: a model built on `torch.device("meta")` holds no
memory, and `to_empty()` + `init_weights()` reproduces a direct build bit for bit, because every
parameter is drawn from its own generator seeded by (seed, parameter name)."""
from __future__ import annotations

import pytest
import torch
from test_models.doubles import registered

import models
from models.config import model_config
from models.init import name_seed, plain_name

BASE = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 64, "max_seq_len": 32}
CASES = {
    "baseline": {},
    "untied-layernorm-qknorm-bias": {"tie_embeddings": False, "qk_norm": True, "ffn": {"bias": True},
                                     "norm": {"block": "layernorm", "final": "layernorm"}},
    "polynorm-residual-scaling": {"ffn": {"kind": "mlp", "activation": "polynorm"}, "residual_init_scaling": True},
    "module-owned-inits": {"layers": {"pattern": "DA", "mixers": {"D": {"kind": "test_double"},
                                                                  "A": {"kind": "attention"}}}},
}


@pytest.mark.parametrize("case", CASES)
def test_meta_build_then_init_equals_direct_build(case):
    with registered():
        cfg = model_config({**BASE, **CASES[case]})
        direct = models.Decoder(cfg, init_seed=5)
        with torch.device("meta"):
            meta = models.Decoder(cfg, init_seed=5)
    assert all(p.is_meta for p in meta.parameters()) and all(b.is_meta for b in meta.buffers())
    meta.to_empty(device="cpu")
    meta.init_weights()
    a, b = direct.state_dict(), meta.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    torch.testing.assert_close(meta.rope.cos, direct.rope.cos, rtol=0, atol=0)


def test_init_depends_only_on_seed_and_name():
    """Parameters of the same name get the same numbers in a deeper model (build order and model
    size do not matter); another seed gives other numbers."""
    small = models.Decoder(model_config(BASE), init_seed=3)
    deep = models.Decoder(model_config({**BASE, "n_layers": 4}), init_seed=3)
    other = models.Decoder(model_config(BASE), init_seed=4)
    deep_params = dict(deep.named_parameters())
    for name, p in small.named_parameters():
        assert torch.equal(p, deep_params[name]), name
    assert not torch.equal(small.blocks[0].mixer.wq.weight, other.blocks[0].mixer.wq.weight)
    # one more init of the same model redraws exactly the same values
    before = {k: v.clone() for k, v in small.state_dict().items()}
    small.init_weights()
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())


def test_wrapper_prefixes_do_not_change_seeds():
    assert plain_name("blocks.0._checkpoint_wrapped_module.mixer.wq.weight") == "blocks.0.mixer.wq.weight"
    assert name_seed(0, "blocks.0._orig_mod.ffn.w2.weight") == name_seed(0, "blocks.0.ffn.w2.weight")


def test_rope_tables_stay_float64_when_the_model_is_cast():
    m = models.Decoder(model_config(BASE))
    ref = m.rope.cos.clone()
    m.to(torch.bfloat16)
    assert m.rope.cos.dtype == torch.float64 and torch.equal(m.rope.cos, ref)
    assert "rope.cos" not in m.state_dict()             # derived from the config: never checkpointed
