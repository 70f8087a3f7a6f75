"""The `mqar` source: Zoology's MQAR layout (arXiv 2312.04927), sample i a pure function of
(data.seed, i), the label mask on answers only, answer accuracy, the keys-shuffled control, and
bad shapes failing with the key named."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ablate_testing import TINY, make_cfg

from models.loss import IGNORE_INDEX
from train.data import DataError, prepare_data
from train.data.source import no_tokenizer_reason

SHAPE = {"vocab_size": 64, "n_pairs": 8}


def mqar_cfg(**mqar):
    return make_cfg(TINY, data__source="mqar", data__seq_len=64, data__mqar={**SHAPE, **mqar})


def test_config_resolves_the_models_vocabulary_and_has_no_tokenizer():
    cfg = mqar_cfg()
    assert cfg.resolved_vocab_size() == 64
    assert "no tokenizer" in no_tokenizer_reason(cfg)
    data = prepare_data(cfg, progress=False)
    assert data.vocab_size == 64 and data.tokenizer_dir is None and data.val_metric_names == ("acc",)
    assert len(data.val_samples(64)) == 256


def test_layout_pairs_then_queries_with_labels_on_answers_only():
    data = prepare_data(mqar_cfg(), progress=False)
    b = data.train_samples(64, 0).batch(np.arange(16))
    ids, labels = b["input_ids"].numpy(), b["labels"].numpy()
    assert ids.shape == labels.shape == (16, 64) and ids.dtype == np.int64
    for x, y in zip(ids, labels):
        keys, values = x[0:16:2], x[1:16:2]
        assert ((keys >= 1) & (keys < 32)).all() and len(set(keys)) == 8
        assert ((values >= 32) & (values < 64)).all() and len(set(values)) == 8
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert len(pos) == 8 and (pos >= 16).all() and (pos % 2 == 0).all()
        answer = dict(zip(keys.tolist(), values.tolist()))
        assert [answer[k] for k in x[pos].tolist()] == y[pos].tolist()   # the value of the key asked


def test_sample_i_is_a_pure_function_of_seed_and_index():
    data = prepare_data(mqar_cfg(), progress=False)
    a = data.train_samples(64, 0).batch(np.array([3, 7]))
    b = data.train_samples(64, 0).batch(np.array([7]))
    assert torch.equal(a["input_ids"][1], b["input_ids"][0]) and torch.equal(a["labels"][1], b["labels"][0])
    other = data.train_samples(64, 1).batch(np.array([7]))
    assert not torch.equal(other["input_ids"], b["input_ids"])
    val = data.val_samples(64).batch(np.array([7]))
    assert not torch.equal(val["input_ids"], b["input_ids"])                 # its own stream
    neg = data.train_samples(64, -1).batch(np.array([7]))                    # a negative seed is a seed too
    assert not torch.equal(neg["input_ids"], other["input_ids"])
    assert torch.equal(neg["input_ids"], data.train_samples(64, -1).batch(np.array([7]))["input_ids"])


def test_fewer_queries_a_shorter_example_and_the_shuffled_control():
    data = prepare_data(mqar_cfg(n_queries=3, seq_len=40), progress=False)
    b = data.train_samples(64, 0).batch(np.arange(8))
    assert ((b["labels"] != IGNORE_INDEX).sum(1) == 3).all()
    assert (b["input_ids"][:, 40:] == 0).all() and (b["labels"][:, 39:] == IGNORE_INDEX).all()
    shuffled = prepare_data(mqar_cfg(shuffle_keys=True), progress=False).train_samples(64, 0).batch(np.arange(8))
    for x, y in zip(shuffled["input_ids"].numpy(), shuffled["labels"].numpy()):
        answer = dict(zip(x[0:16:2].tolist(), x[1:16:2].tolist()))
        pos = np.flatnonzero(y != IGNORE_INDEX)
        assert all(answer[k] != v for k, v in zip(x[pos].tolist(), y[pos].tolist()))   # never recallable
        assert set(y[pos].tolist()) <= set(answer.values())                    # but an in-context value


def test_zeros_between_the_queries_keep_the_same_pairs_and_queries():
    """random_non_queries: false (Zoology's figure-2 setting) only blanks the filler: the pairs,
    the queried keys and the labels are those of the default example."""
    idx = np.arange(8)
    rand = prepare_data(mqar_cfg(), progress=False).train_samples(64, 0).batch(idx)
    zero = prepare_data(mqar_cfg(random_non_queries=False), progress=False).train_samples(64, 0).batch(idx)
    assert torch.equal(zero["labels"], rand["labels"])
    kept = torch.zeros_like(rand["labels"], dtype=torch.bool)
    kept[:, :16] = True                                          # the 8 pairs
    kept |= rand["labels"] != IGNORE_INDEX                       # the query keys
    assert torch.equal(zero["input_ids"][kept], rand["input_ids"][kept])
    assert (zero["input_ids"][~kept] == 0).all() and (rand["input_ids"][~kept] != 0).float().mean() > 0.9


def test_val_metrics_is_answer_accuracy():
    data = prepare_data(mqar_cfg(), progress=False)
    b = data.val_samples(64).batch(np.arange(4))
    logits = torch.zeros(4, 64, 64)
    mask = b["labels"] != IGNORE_INDEX
    logits[mask, b["labels"][mask]] = 1.0
    assert data.val_metrics(logits, b) == {"acc": (32.0, 32)}
    assert data.val_metrics(torch.zeros(4, 64, 64), b)["acc"][0] == float((b["labels"][mask] == 0).sum())


@pytest.mark.parametrize(("mqar", "key", "match"), [
    ({"n_pairs": 17}, "data.mqar.n_pairs", "need 68 tokens"),               # 17 pairs + 17 queries > 64
    ({"n_pairs": 8, "n_queries": 9}, "data.mqar.n_queries", "n_pairs=8"),
    ({"n_pairs": 8, "vocab_size": 16}, "data.mqar.n_pairs", "distinct keys"),
    ({"seq_len": 80}, "data.mqar.seq_len", "data.seq_len=64"),
    ({"power_a": 0.0}, "data.mqar.power_a", "> 0"),
    ({"vocab_size": 3, "n_pairs": 1}, "data.mqar.vocab_size", ">= 4"),      # the default split: the key not set
    ({"vocab_size": 16, "key_vocab": 16, "n_pairs": 1}, "data.mqar.key_vocab", "vocab_size-1=15"),
])
def test_bad_shapes_name_the_key(mqar, key, match):
    with pytest.raises(DataError, match=match) as e:
        mqar_cfg(**mqar)
    assert e.value.key == key
