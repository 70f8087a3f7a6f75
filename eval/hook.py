"""In-training evaluation: `eval.every`, `eval.tasks`, `eval.limit` (+ include_path, data_dir).

The `InTrainingEval` callback (eval/callbacks.py) calls `run_in_training_eval(...)` at every step
boundary; it returns at once unless an evaluation is due. When it runs, it leaves the trainer
exactly as it found it: the model's train/eval mode, no gradients, and every RNG state (lm-eval
seeds python, numpy and torch), so a run with the hook has the same losses as one without.

FSDP2 / DDP: every rank must make the call (as the trainer does at each step). All ranks run
the same requests in lockstep (eval/adapter.py), the reuse decision is rank 0's, and only rank
0 writes the result file and the metrics rows. Nothing is sharded: evaluation costs the same
wall time on N ranks as on one, which is fine with `eval.limit`.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from train.rundir import RunDir


def eval_due(cfg: Any, step: int) -> bool:
    """Every `eval.every` steps and at the last step, when tasks are configured."""
    e = cfg.eval
    if not e.every or not e.tasks:
        return False
    return step % e.every == 0 or step == cfg.train.steps


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore python, numpy, torch CPU and CUDA RNG states on exit."""
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def run_in_training_eval(model: nn.Module, cfg: Any, run: RunDir | str | Path, step: int,
                         device: torch.device | str | None = None, *, tokenizer_dir: str | Path | None = None,
                         val_data: Any = None, log: Callable[[dict[str, Any]], None] | None = None,
                         force: bool = False) -> dict[str, Any] | None:
    """Evaluate `model` on cfg.eval.tasks if due at `step`; returns rank 0's result or None.

    `device` is accepted for the trainer's convenience (the adapter uses the model's own device);
    `val_data` is the run's validation TokenData (saves re-preparing data for ablate_val_ppl);
    `log` is the trainer's metrics logger (default: append to metrics.jsonl).
    """
    if not (force or eval_due(cfg, step)):
        return None
    from eval.runner import EvalSpec, evaluate_model
    from train.data import load_tokenizer
    from train.data.source import no_tokenizer_reason

    run = run if isinstance(run, RunDir) else RunDir(run)
    reason = no_tokenizer_reason(cfg) if tokenizer_dir is None else None
    if reason is not None:          # a synthetic source: nothing lm-eval can read; say so once per eval
        row = {"kind": "event", "event": "eval_skipped", "step": step, "tasks": list(cfg.eval.tasks),
               "reason": reason}
        (log or run.log)(row)
        return None
    e = cfg.eval
    spec = EvalSpec(tasks=list(e.tasks), limit=e.limit, include_path=e.include_path or [], data_dir=e.data_dir,
                    batch_size=getattr(e, "batch_size", None) or cfg.train.micro_batch)
    tokenizer = load_tokenizer(tokenizer_dir or run.tokenizer_dir)
    was_training = model.training
    try:
        with preserved_rng(), torch.no_grad():
            return evaluate_model(model, tokenizer, run, step, spec, val_data=val_data, log=log, source="train")
    finally:
        model.train(was_training)
