"""The adapter on every architecture option: each technique issue adds its model overrides to
ARCHITECTURES, so evaluation keeps working (loglikelihood, rolling and cached greedy decoding
against direct full-forward computations, random weights)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from eval.adapter import AblateLM

ARCHITECTURES = {
    "baseline": {},
    "gqa_qknorm_untied": {"n_kv_heads": 1, "qk_norm": True, "tie_embeddings": False},
    "sliding_window": {"layers": {"pattern": "SA", "mixers": {"A": {"kind": "attention"},
                                                             "S": {"kind": "attention", "window": 8}}}},
    "mlp_layernorm": {"ffn": {"kind": "mlp", "activation": "gelu"}, "norm": {"block": "layernorm",
                                                                             "final": "layernorm"}},
    "polynorm": {"ffn": {"kind": "mlp", "activation": "polynorm"}},
    "stochastic_glu": {"ffn": {"kind": "glu", "activation": "stochastic",
                               "stochastic": {"p": 0.5, "eval_mode": "stochastic", "seed": 3}}},
    "fused_linear_no_norm": {"ffn": {"kind": "fused_linear", "activation": "identity"},
                             "norm": {"block": "none", "final": "rmsnorm"}},
}
CODE = "def f(x):\n    return x * 2\n\nfor i in range(10):\n    print(f(i))\n"


def _model(trained_run, overrides: dict):
    import models
    from models.config import ModelConfig
    from models.schema import build, validate_tree
    from train.runtime import load_run_config

    raw = copy.deepcopy(load_run_config(trained_run).to_dict()["model"])
    for k, v in overrides.items():
        raw[k] = {**raw[k], **v} if isinstance(v, dict) and isinstance(raw.get(k), dict) and k != "layers" else v
    cfg = build(ModelConfig, raw, "model")
    validate_tree(cfg, "model")
    torch.manual_seed(0)
    return models.Decoder(cfg).eval()


@torch.no_grad()
def _logp(model, ids: list[int]) -> torch.Tensor:
    return F.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_adapter_matches_direct(arch, trained_run, model_and_tok):
    _, tok = model_and_tok
    model = _model(trained_run, ARCHITECTURES[arch])
    lm = AblateLM(model, tok, batch_size=2)
    # loglikelihood (short contexts: one window each)
    pairs = [("def f(x):", "\n    return"), ("for i in", " range(10):"), ("x", " = 1")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, _) in zip(pairs, got):
        c, t = lm._encode_pair(ctx, cont)
        lp = _logp(model, (c + t)[:-1])[-len(t):]
        assert ll == pytest.approx(float(lp.gather(-1, torch.tensor(t)[:, None]).sum()), abs=1e-3)
    # rolling on a document that fits
    [roll] = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (CODE,), 0)])
    ids = [tok.eos_token_id] + tok.encode(CODE, add_special_tokens=False)
    assert len(ids) <= lm.max_length
    assert roll == pytest.approx(float(_logp(model, ids[:-1]).gather(-1, torch.tensor(ids[1:])[:, None]).sum()),
                                 abs=1e-3)
    # cached greedy decoding of a batch with unequal prompts == full forwards, one token at a time
    prompts = [lm.tok_encode(p) for p in ("def ", CODE[:30], "x")]
    outs = lm.greedy(prompts, 6)
    for p, out in zip(prompts, outs):
        ref: list[int] = []
        for _ in range(6):
            nxt = int(_logp(model, p + ref)[-1].argmax())
            if nxt == lm.eot_token_id:
                break
            ref.append(nxt)
        assert out == ref
