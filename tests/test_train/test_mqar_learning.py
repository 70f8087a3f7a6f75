"""DeltaNet learns multi-query associative recall (MQAR, "Zoology", arXiv 2312.04927) at a tiny
fixed shape: 8 pairs, 32 values (chance 1/32), T=64, d=64, 2 layers, seed fixed. It reaches
answer accuracy >= 0.5 and >= 4x the accuracy of the same model trained with the keys shuffled
(`data.mqar.shuffle_keys`: only the in-context value distribution is learnable, about 1/7). One
module fixture per mixer trains both; the batches come from the `mqar` source and the accuracy
is its `val_metrics`.

Softmax attention is not here: at this shape it stays on the copy-a-context-value plateau
(<= 0.13) through 300 steps (lr 3e-3 .. 3e-2, batch 32 .. 128, 1 .. 4 heads, QK-norm) and
through 700 (lr 3e-3): without DeltaNet's short convolution it must first form an induction
(previous-token) head."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ablate_testing import TINY, make_cfg

import models
from models.loss import IGNORE_INDEX
from train.data import prepare_data

MIXERS = {"deltanet": {"D": {"kind": "deltanet", "chunk_size": 64}}}   # T=64: one chunk, the fastest form
STEPS = {"deltanet": 300}     # measured: a 250-step run reaches 0.52 (too close), 300 steps 0.80; shuffled ~0.12
LR = {"deltanet": 3.0e-3}
BATCH, WARMUP = 32, 20


def _answer_accuracy(mixer: str, shuffle_keys: bool) -> float:
    """Train the 2-layer model for STEPS[mixer] AdamW steps on a fresh MQAR stream; accuracy on
    the source's 256 validation examples."""
    cfg = make_cfg(TINY, seed=0, data__source="mqar", data__seq_len=64,
                   data__mqar={"vocab_size": 64, "n_pairs": 8, "shuffle_keys": shuffle_keys},
                   model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64,
                          "layers": {"pattern": next(iter(MIXERS[mixer])), "mixers": MIXERS[mixer]}})
    data = prepare_data(cfg, progress=False)
    cfg.model.vocab_size = cfg.resolved_vocab_size()
    torch.manual_seed(0)
    model = models.Decoder(cfg.model, init_seed=0)
    steps = STEPS[mixer]
    opt = torch.optim.AdamW(model.parameters(), lr=LR[mixer], betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.55 + 0.45 * np.cos(np.pi * s / steps)))
    train = data.train_samples(64, cfg.data.seed)
    for step in range(steps):
        b = train.batch(np.arange(step * BATCH, (step + 1) * BATCH))
        logits = model(b["input_ids"]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(),
                                                 ignore_index=IGNORE_INDEX)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    val = data.val_samples(64)
    hits = count = 0.0
    with torch.no_grad():
        for lo in range(0, len(val), 128):
            b = val.batch(np.arange(lo, min(lo + 128, len(val))))
            h, n = data.val_metrics(model(b["input_ids"]).logits, b)["acc"]
            hits, count = hits + h, count + n
    return hits / count


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def deltanet_recall() -> tuple[float, float]:
    return _answer_accuracy("deltanet", False), _answer_accuracy("deltanet", True)


def test_deltanet_learns_mqar(deltanet_recall):
    acc, shuffled = deltanet_recall
    assert acc >= 0.5 and acc >= 4 * shuffled, (acc, shuffled)
