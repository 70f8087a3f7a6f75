"""The MQAR trainings of tests/test_train/test_mqar_learning.py, importable by the spawned worker
processes that run them (pytest's importlib mode leaves test modules unimportable by name)."""
from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from ablate_testing import TINY, make_cfg

import models
from models.loss import IGNORE_INDEX
from train.data import prepare_data

MIXERS = {"deltanet": {"D": {"kind": "deltanet", "chunk_size": 64}},   # T=64: one chunk, the fastest form
          # pre_conv: the paper's Mamba-backbone temporal conv (x + causal depthwise conv); mini_batch 16
          "ttt_linear": {"T": {"kind": "ttt_linear", "pre_conv": True}},
          "attention": {"A": {"kind": "attention"}}}            # full causal attention in both layers
STEPS = {"deltanet": 300,     # measured: a 250-step run reaches 0.52 (too close), 300 steps 0.80; shuffled ~0.12
         "ttt_linear": 150,   # a loss test, measured in test_ttt_linear_mqar_loss_falls
         "attention": 300}    # measured in test_attention_learns_mqar
LR = {"deltanet": 3.0e-3, "ttt_linear": 3.0e-3, "attention": 3.0e-3}
# attention: an untied LM head (tied, it stays on the no-recall plateau) and a larger init
MODEL = {"attention": {"init_std": 0.05, "tie_embeddings": False}}
BATCH = {"attention": 64}     # at 32 (warm-up 50) two init seeds of six end at 0.27 and 0.58
WARMUP = {"attention": 50}    # at 20 (batch 32) it stays near the plateau: 0.28, 0.12 for init seeds 0, 1


def answer_metrics(mixer: str, shuffle_keys: bool) -> tuple[float, float]:
    """Train the 2-layer model (one thread) for STEPS[mixer] AdamW steps of BATCH[mixer] (32)
    sequences on a fresh MQAR stream; (accuracy, mean answer-token cross-entropy) on the source's
    256 validation examples."""
    torch.set_num_threads(1)
    cfg = make_cfg(TINY, seed=0, data__source="mqar", data__seq_len=64,
                   data__mqar={"vocab_size": 64, "n_pairs": 8, "shuffle_keys": shuffle_keys},
                   model={"d_model": 64, "n_layers": 2, "n_heads": 2, "max_seq_len": 64, **MODEL.get(mixer, {}),
                          "layers": {"pattern": "".join(MIXERS[mixer]), "mixers": MIXERS[mixer]}})
    data = prepare_data(cfg, progress=False)
    cfg.model.vocab_size = cfg.resolved_vocab_size()
    torch.manual_seed(0)
    model = models.Decoder(cfg.model, init_seed=0)
    steps, batch, warmup = STEPS[mixer], BATCH.get(mixer, 32), WARMUP.get(mixer, 20)
    opt = torch.optim.AdamW(model.parameters(), lr=LR[mixer], betas=(0.9, 0.98), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.55 + 0.45 * np.cos(np.pi * s / steps)))
    train = data.train_samples(64, cfg.data.seed)
    for step in range(steps):
        b = train.batch(np.arange(step * batch, (step + 1) * batch))
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


def run_trainings(jobs: list[tuple[str, bool]], workers: int = 2) -> dict[tuple[str, bool], tuple[float, float]]:
    """`answer_metrics` for each (mixer, shuffle_keys), in `workers` spawned one-thread processes
    (jobs in the order given: longest first keeps the workers even). The trainings are independent
    and CPU-bound, so on CI's two cores two workers halve the wall time; each is deterministic
    whichever process runs it."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=ctx) as pool:
        futures = {job: pool.submit(answer_metrics, *job) for job in jobs}
        return {job: f.result() for job, f in futures.items()}
