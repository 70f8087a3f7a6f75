"""Which mixers learn multi-query associative recall (MQAR, "Zoology", arXiv 2312.04927) at a
tiny fixed shape: 8 pairs, 32 values (chance 1/32), T=64, d=64, 2 layers, seed fixed.

Softmax attention (full attention in both layers) and DeltaNet reach answer accuracy >= 0.5 and
>= 4x the accuracy of the same model trained with the keys shuffled (`data.mqar.shuffle_keys`:
only the in-context value distribution is learnable, about 1/7). TTT-Linear (with `pre_conv`) is
a loss test: its answer loss falls 0.5 below ln 8, the floor of any model that ignores which key
is asked. One module fixture trains every model the selected tests need, two at a time in worker
processes (tests/mqar_recall.py); the batches come from the `mqar` source and the accuracy is its
`val_metrics`."""
from __future__ import annotations

import numpy as np
import pytest
from mqar_recall import run_trainings

NO_RECALL_LOSS = float(np.log(8))   # the best answer loss without recall: uniform over the 8 in-context values

# the (mixer, shuffle_keys) trainings each test needs, longest first
NEEDS = {"test_attention_learns_mqar": [("attention", False), ("attention", True)],
         "test_deltanet_learns_mqar": [("deltanet", False), ("deltanet", True)],
         "test_ttt_linear_mqar_loss_falls": [("ttt_linear", False)]}


@pytest.fixture(scope="module")
def recall(request) -> dict[tuple[str, bool], tuple[float, float]]:
    """(accuracy, answer loss) of every training the selected tests of this module need, run two
    at a time in worker processes (tests/mqar_recall.py)."""
    selected = {item.originalname for item in request.session.items if getattr(item, "module", None) is request.module}
    return run_trainings([job for name, jobs in NEEDS.items() if name in selected for job in jobs])


def test_deltanet_learns_mqar(recall):
    (acc, _), (shuffled, _) = recall["deltanet", False], recall["deltanet", True]
    assert acc >= 0.5 and acc >= 4 * shuffled, (acc, shuffled)


def test_ttt_linear_mqar_loss_falls(recall):
    """TTT-Linear's answer loss falls clearly: from ln 64 = 4.16 at init to at least 0.5 below
    ln 8 = 2.08, the floor of any model that ignores which key is asked (the 8 values are
    equally likely, and no answer is shown), so the shuffled-keys control (floor ln 7 = 1.95)
    cannot pass it. Measured (150 steps): 0.73, accuracy 0.86; data / init seeds (1, 0), (0, 1),
    (2, 2): 0.84, 0.38, 0.70 (accuracy 0.85 .. 0.94); shuffled keys 2.68 (0.12). 120 steps at
    lr 4e-3: 1.29 (too close); lr 5e-3 stalls (3.0). Without pre_conv TTT-Linear only learns the
    value distribution: 2.21 (0.13) at 300 steps against 2.22 shuffled (0.12)."""
    acc, loss = recall["ttt_linear", False]
    assert loss <= NO_RECALL_LOSS - 0.5, (loss, acc)


def test_attention_learns_mqar(recall):
    """Full attention with an untied LM head, init_std 0.05, batch 64, warm-up 50. Measured (300
    steps): 0.998 against 0.132 shuffled; init seeds 1 .. 5: 0.999 .. 1.000; at 250 steps 1.00
    (init seeds 3, 5), at 200 0.31 .. 0.40 (seeds 0, 1, 3, 5: leaving the plateau). What keeps it
    on or near the no-recall plateau (<= 0.134, answer loss above ln 8 = 2.08) at this budget:
    tied embeddings (every setting tried, among them this recipe: 0.14, 0.13 for init seeds 0, 1;
    batch 512; 5000 steps), or at batch 32 a warm-up of 20 (untied: 0.28, 0.12 for init seeds
    0, 1). At batch 32 and warm-up 50 init seeds 0 .. 5 give 0.92, 1.00, 1.00, 0.27, 1.00, 0.58
    (docs/benchmarks.md)."""
    (acc, _), (shuffled, _) = recall["attention", False], recall["attention", True]
    assert acc >= 0.5 and acc >= 4 * shuffled, (acc, shuffled)
