"""The evaluation callbacks the composition root (train/cli.py) hands to the trainer: lm-eval in
the loop (`eval.every`, `eval.tasks`) and the probes that run after each validation."""
from __future__ import annotations

from typing import Any

from eval.hook import eval_due, run_in_training_eval
from eval.probes.entropy import EntropyProbe
from eval.probes.sparsity import SparsityProbe
from train.callbacks import Callback, TrainState


class InTrainingEval(Callback):
    """lm-eval tasks every `eval.every` steps and at the last step, on every rank in lockstep,
    leaving the model's mode and every RNG state as found (eval/hook.py)."""

    name = "lm_eval"

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if eval_due(state.cfg, state.step):
            run_in_training_eval(state.model, state.cfg, state.run, state.step, state.device,
                                 val_data=getattr(state.data, "val", None), log=state.log)


def eval_callbacks(cfg: Any) -> list[Callback]:
    """The eval-side callbacks active for `cfg`."""
    out: list[Callback] = [SparsityProbe()]
    if cfg.train.probe_every:
        out.append(EntropyProbe())
    if cfg.eval.every and cfg.eval.tasks:
        out.append(InTrainingEval())
    return out
