"""The lm-eval adapter against direct computations from our model's logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from lm_eval.api.instance import Instance

from eval.adapter import AblateLM

TEXT = ("def parse(args):\n    \"\"\"Return the parsed options.\"\"\"\n    for name in args:\n"
        "        print(name)\n    return args\n")


def _inst(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


@torch.no_grad()
def _logp(model, ids: list[int]) -> torch.Tensor:
    logits = model(torch.tensor([ids])).logits
    return F.log_softmax(logits[0].float(), dim=-1)


def _reference(model, ids: list[int], start: int, L: int) -> tuple[float, bool]:
    """sum log p(ids[j] | up to L preceding tokens) for j >= start, computed window by window
    with no batching or padding; and whether every ids[j] is the argmax."""
    total, greedy = 0.0, True
    for a in range(start, len(ids), L):
        b = min(a + L, len(ids))
        lp = _logp(model, ids[max(0, b - 1 - L):b - 1])[-(b - a):]
        target = torch.tensor(ids[a:b])
        total += float(lp.gather(-1, target[:, None]).sum())
        greedy = greedy and bool((lp.argmax(-1) == target).all())
    return total, greedy


def test_loglikelihood_matches_direct(model_and_tok):
    model, tok = model_and_tok
    lm = AblateLM(model, tok, batch_size=3)
    L = lm.max_length
    long_ctx = TEXT * 12                      # far beyond max_length: left-truncated
    pairs = [("def parse(args):", "\n    return"), ("", "import os"), ("x = 1\ny =", " 2"),
             (long_ctx, " print(name)"), ("for name in", " args:"), ("Hello ", "world"),
             ("x =", TEXT * 3)]               # a continuation longer than max_length: scored in pieces
    got = lm.loglikelihood([_inst("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (ll, greedy) in zip(pairs, got):
        if ctx:
            c_ids, t_ids = lm._encode_pair(ctx, cont)
        else:
            c_ids, t_ids = [tok.eos_token_id], tok.encode(cont, add_special_tokens=False)
        ref_ll, ref_greedy = _reference(model, c_ids + t_ids, len(c_ids), L)
        assert ll == pytest.approx(ref_ll, abs=1e-3) and greedy == ref_greedy
    assert len(lm.tok_encode(long_ctx)) > L and len(lm.tok_encode(pairs[-1][1])) > 2 * L
    assert lm._encode_pair("Hello ", "world")[0] == [tok.eos_token_id] + tok.encode("Hello")


def test_rolling_equals_summed_token_logprobs(model_and_tok):
    model, tok = model_and_tok
    lm = AblateLM(model, tok, batch_size=4)
    docs = ["short doc: x = 1", TEXT * 6]
    got = lm.loglikelihood_rolling([_inst("loglikelihood_rolling", (d,), i) for i, d in enumerate(docs)])
    for doc, ll in zip(docs, got):
        ids = [tok.eos_token_id] + tok.encode(doc, add_special_tokens=False)
        assert ll == pytest.approx(_reference(model, ids, 1, lm.max_length)[0], abs=1e-3)
    assert len(tok.encode(docs[1])) > 2 * lm.max_length


@torch.no_grad()
def _reference_greedy(model, lm: AblateLM, ctx: str, n: int, max_ctx: int) -> list[int]:
    ids = lm.tok_encode(ctx)[-max_ctx:]
    out = []
    for _ in range(n):                         # no cache: a full forward per token
        nxt = int(_logp(model, ids + out)[-1].argmax())
        if nxt == lm.eot_token_id:
            break
        out.append(nxt)
    return out


@pytest.fixture(scope="module")
def random_model(trained_run):
    """Untrained weights: varied argmax tokens (16 training steps mostly predict spaces)."""
    import models
    from train.runtime import load_run_config
    torch.manual_seed(1)
    return models.Decoder(load_run_config(trained_run).model).eval()


@pytest.mark.parametrize("which", ["trained", "random"])
def test_greedy_generation_equals_stepwise_argmax(model_and_tok, random_model, which):
    model, tok = model_and_tok
    model = model if which == "trained" else random_model
    lm = AblateLM(model, tok, batch_size=4)
    n = 12
    contexts = ["def ", "import os\nimport sys\n\n\nclass Foo:\n", TEXT, "x", TEXT * 5]
    reqs = [_inst("generate_until", (c, {"until": [], "max_gen_toks": n}), i) for i, c in enumerate(contexts)]
    got = lm.generate_until(reqs)
    for ctx, text in zip(contexts, got):
        ref = _reference_greedy(model, lm, ctx, n, lm.max_length - n)
        assert text == tok.decode(ref, skip_special_tokens=True)
    # stop strings cut the generation at their first occurrence
    ref_text = got[1]
    if len(ref_text) >= 3:
        stop = ref_text[1:3]
        [cut] = lm.generate_until([_inst("generate_until", (contexts[1], {"until": [stop], "max_gen_toks": n}))])
        assert cut == ref_text.split(stop)[0]


def test_greedy_respects_max_length(model_and_tok):
    """max_gen_toks beyond the model's length is capped; contexts are left-truncated."""
    model, tok = model_and_tok
    lm = AblateLM(model, tok, batch_size=2)
    req = _inst("generate_until", (TEXT * 10, {"until": [], "max_gen_toks": 10 * lm.max_length}))
    [text] = lm.generate_until([req])
    assert len(tok.encode(text)) <= lm.max_length
