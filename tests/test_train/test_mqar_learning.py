"""Which mixers learn multi-query associative recall (MQAR, "Zoology", arXiv 2312.04927) at a
tiny fixed shape: 8 pairs, 32 values (chance 1/32), T=64, d=64, 2 layers, seed fixed.

DeltaNet, and softmax attention whose first layer is a sliding window of 3 (`attention_local`),
reach answer accuracy >= 0.5 and >= 4x the accuracy of the same model trained with the keys
shuffled (`data.mqar.shuffle_keys`: only the in-context value distribution is learnable, about
1/7). TTT-Linear (with `pre_conv`) is a loss test: its answer loss falls 0.5 below ln 8, the floor
of any model that ignores which key is asked. One module fixture per mixer; the batches come from
the `mqar` source and the accuracy is its `val_metrics`.

Plain softmax attention (full attention in both layers) is not here: at this shape it stays on the
no-recall plateau (accuracy <= 0.134, answer loss above ln 8 = 2.08) through 300 steps in every
configuration tried: lr 1e-3 .. 3e-2 (warm-up 20 .. 100, betas (0.9, 0.95 .. 0.999), weight decay
0.1), batch 32 .. 256, 1 .. 4 heads, QK-norm, learnable temperature, rope_theta 10 .. 1e4,
init_std 0.006 .. 0.1, residual init scaling, untied embeddings, z-loss 1e-4, muP, LayerNorm, a
GELU MLP, uniform query gaps (power_a 1); every key is already queried (n_queries = n_pairs). It is
still there after 2000 steps (lr 3e-3: 0.12) and 5000 (lr 5e-3, 4 heads, init_std 0.05: 0.127,
loss 2.09), and even with 2 pairs (1000 steps: 0.48, chance 0.5). It must first form the
previous-token half of an induction head; a window-3 first layer (as DeltaNet's short convolution,
or TTT's pre_conv) gives it that, and then it learns in 150 .. 200 steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ablate_testing import TINY, make_cfg

import models
from models.loss import IGNORE_INDEX
from train.data import prepare_data

MIXERS = {"deltanet": {"D": {"kind": "deltanet", "chunk_size": 64}},   # T=64: one chunk, the fastest form
          # pre_conv: the paper's Mamba-backbone temporal conv (x + causal depthwise conv); mini_batch 16
          "ttt_linear": {"T": {"kind": "ttt_linear", "pre_conv": True}},
          # layer 1 sees itself and the 2 tokens before it, layer 2 everything
          "attention_local": {"L": {"kind": "attention", "window": 3}, "A": {"kind": "attention"}}}
STEPS = {"deltanet": 300,     # measured: a 250-step run reaches 0.52 (too close), 300 steps 0.80; shuffled ~0.12
         "ttt_linear": 150,   # a loss test, measured in test_ttt_linear_mqar_loss_falls
         "attention_local": 300}   # measured in test_attention_local_learns_mqar
LR = {"deltanet": 3.0e-3, "ttt_linear": 3.0e-3, "attention_local": 3.0e-3}
MODEL = {"attention_local": {"init_std": 0.05}}   # at 0.02 a window 2, 3 or 4 first layer stays at ln 32
BATCH, WARMUP = 32, 20
NO_RECALL_LOSS = float(np.log(8))   # the best answer loss without recall: uniform over the 8 in-context values


def _answer_accuracy(mixer: str, shuffle_keys: bool) -> float:
    """Answer accuracy of `_answer_metrics`."""
    return _answer_metrics(mixer, shuffle_keys)[0]


def _answer_metrics(mixer: str, shuffle_keys: bool) -> tuple[float, float]:
    """Train the 2-layer model for STEPS[mixer] AdamW steps on a fresh MQAR stream; (accuracy,
    mean answer-token cross-entropy) on the source's 256 validation examples."""
    cfg = make_cfg(TINY, seed=0, data__source="mqar", data__seq_len=64,
                   data__mqar={"vocab_size": 64, "n_pairs": 8, "shuffle_keys": shuffle_keys},
                   model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, **MODEL.get(mixer, {}),
                          "layers": {"pattern": "".join(MIXERS[mixer]), "mixers": MIXERS[mixer]}})
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
    hits = count = loss_sum = 0.0
    with torch.no_grad():
        for lo in range(0, len(val), 128):
            b = val.batch(np.arange(lo, min(lo + 128, len(val))))
            logits = model(b["input_ids"]).logits
            h, n = data.val_metrics(logits, b)["acc"]
            hits, count = hits + h, count + n
            loss_sum += float(torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), b["labels"].flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
    return hits / count, loss_sum / count


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


@pytest.fixture(scope="module")
def ttt_linear_metrics() -> tuple[float, float]:
    return _answer_metrics("ttt_linear", False)


def test_ttt_linear_mqar_loss_falls(ttt_linear_metrics):
    """TTT-Linear's answer loss falls clearly: from ln 64 = 4.16 at init to at least 0.5 below
    ln 8 = 2.08, the floor of any model that ignores which key is asked (the 8 values are
    equally likely, and no answer is shown), so the shuffled-keys control (floor ln 7 = 1.95)
    cannot pass it. Measured (150 steps): 0.73, accuracy 0.86; data / init seeds (1, 0), (0, 1),
    (2, 2): 0.84, 0.38, 0.70 (accuracy 0.85 .. 0.94); shuffled keys 2.68 (0.12). 120 steps at
    lr 4e-3: 1.29 (too close); lr 5e-3 stalls (3.0). Without pre_conv TTT-Linear only learns the
    value distribution: 2.21 (0.13) at 300 steps against 2.22 shuffled (0.12)."""
    acc, loss = ttt_linear_metrics
    assert loss <= NO_RECALL_LOSS - 0.5, (loss, acc)


@pytest.fixture(scope="module")
def attention_local_recall() -> tuple[float, float]:
    return _answer_accuracy("attention_local", False), _answer_accuracy("attention_local", True)


def test_attention_local_learns_mqar(attention_local_recall):
    """Softmax attention with a window-3 first layer, init_std 0.05. Measured (300 steps): 1.00
    against 0.127 shuffled; it leaves the plateau at steps 150 .. 200 (0.12 at 100, 1.00 at 200).
    Data / init seeds (1, 0), (0, 1), (2, 2): 1.00 each; lr 2e-3 / 5e-3: 1.00; init_std 0.08:
    1.00; window 4: 0.88; window 2: 0.33 (init_std 0.05), 1.00 (0.08); init_std 0.02: 0.03 (stuck
    at ln 32, windows 2 .. 4). Full attention in layer 1: <= 0.134 (the module docstring)."""
    acc, shuffled = attention_local_recall
    assert acc >= 0.5 and acc >= 4 * shuffled, (acc, shuffled)
