"""Local tasks through lm-eval: the run's validation perplexity (always) and the ../shared sets."""
from __future__ import annotations

import json
import math

import pytest
from ablate_testing import train_rows
from lm_eval.api.instance import Instance

from eval.adapter import AblateLM
from eval.local import val_docs_path
from eval.runner import EvalSpec, evaluate_run
from eval.tasks import utils
from train.rundir import RunDir


def test_val_ppl_task_matches_adapter(fresh_run, model_and_tok):
    [res] = evaluate_run(fresh_run, "latest", EvalSpec(["ablate_val_ppl"], limit=2))
    m = res["metrics"]["ablate_val_ppl"]
    assert set(m) == {"word_perplexity", "byte_perplexity", "bits_per_byte"}
    assert m["bits_per_byte"]["value"] == pytest.approx(math.log2(m["byte_perplexity"]["value"]), rel=1e-6)
    # byte perplexity = exp(-sum loglik / sum bytes) over the first 2 validation documents
    path = val_docs_path(RunDir(fresh_run))
    docs = [json.loads(line)["text"] for line in path.read_text().splitlines()][:2]
    model, tok = model_and_tok
    lls = AblateLM(model, tok).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    nbytes = sum(len(d.encode("utf-8")) for d in docs)
    assert m["byte_perplexity"]["value"] == pytest.approx(math.exp(-sum(lls) / nbytes), rel=1e-4)
    assert res["step"] == 16 and res["n_samples"]["ablate_val_ppl"]["effective"] == 2
    assert {r["metric"] for r in train_rows(fresh_run, "eval") if r["task"] == "ablate_val_ppl"} == set(m)


def test_hellaswag_parse_follows_lm_eval_preprocessing():
    lines = ["Roof shingle removal: A man is sitting on a roof. he", "3", "is using wrap [step] here.",
             "is ripping  level tiles off.", "is holding a rubik's cube.", "starts pulling up roofing."]
    [doc] = utils.parse_hellaswag(lines)
    assert doc["query"] == "Roof shingle removal: A man is sitting on a roof. He"
    assert doc["choices"][:2] == ["is using wrap here.", "is ripping level tiles off."]
    assert doc["label"] == 3
    with pytest.raises(ValueError):
        utils.parse_hellaswag(lines[:5])


def test_hellaswag_and_arc_easy_with_limit(fresh_run, shared_eval):
    [res] = evaluate_run(fresh_run, "latest", EvalSpec(["ablate_hellaswag", "ablate_arc_easy"], limit=4,
                                                       data_dir=str(shared_eval)))
    for task in ("ablate_hellaswag", "ablate_arc_easy"):
        assert set(res["metrics"][task]) == {"acc", "acc_norm"}
        for m in res["metrics"][task].values():
            assert 0.0 <= m["value"] <= 1.0 and m["stderr"] is not None
        assert res["n_samples"][task]["effective"] == 4
        assert res["versions"][task] == 1.0
    docs = utils.read_hellaswag(shared_eval)
    assert len(docs) == 10042 and docs[0]["query"] == "Roof shingle removal: A man is sitting on a roof. He"
