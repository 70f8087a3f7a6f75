"""`model.norm.removal`: the LayerNorm removal schedule (models/norm_removal.py).

Heimersheim, "You can remove GPT2's LayerNorm by fine-tuning" (arXiv 2409.13710). A norm
switched at step s must be fake for step s's forward and freeze the stds of step s - 1's batch:

    on_step_start (step s - 1)   every norm's divisor sums are zeroed (training forwards add to them)
    on_step_end   (s steps done) the due norms' sums and counts are summed over data-parallel ranks, the
                                 norms freeze and turn fake; an eot / bos switch ends that special
                                 std in every norm; each switch is a `norm_switch` event

The switch state lives in module buffers, so the checkpoint saved at this boundary already has it
and a resumed run continues exactly; on the first step of a segment the buffers are checked against
the schedule (a mismatch, e.g. `init_from` a run whose norms are already fake, is an error).
"""
from __future__ import annotations

from typing import Any

import torch

from models.init import plain_name
from models.norm_removal import BOS, EOT, FAKE_GROUPS, KIND_NAMES, RemovableNorm, Switch, removal_schedule
from train.callbacks import Callback, TrainState, register_callback


def removable_norms(model: torch.nn.Module) -> dict[str, RemovableNorm]:
    """{Decoder module name: norm} through wrappers (activation checkpointing, compile)."""
    return {plain_name(name): m for name, m in model.named_modules() if isinstance(m, RemovableNorm)}


def expected_state(schedule: list[Switch], step: int, name: str) -> tuple[bool, list[bool]]:
    """(fake, special flags) norm `name` has after `step` steps."""
    fake = any(s.module_name() == name and s.step <= step for s in schedule)
    special = [not any(s.group == g and s.step <= step for s in schedule) for g in ("eot", "bos")]
    return fake, special


class NormRemoval(Callback):
    def __init__(self, schedule: list[Switch]):
        self.schedule = schedule
        self.norms: dict[str, RemovableNorm] | None = None    # found, and checked, on the first step

    def on_step_start(self, state: TrainState) -> None:
        if self.norms is None:
            self.norms = removable_norms(state.model)
            self._check(self.norms, state.step)
        for norm in self.norms.values():
            norm.stats.zero_()

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        switches = [s for s in self.schedule if s.step == state.step]
        if not switches:
            return
        norms = self.norms if self.norms is not None else removable_norms(state.model)
        for sw in switches:
            row = {"kind": "event", "event": "norm_switch", "step": state.step, "group": sw.group}
            if sw.group in FAKE_GROUPS:
                norm = norms.get(sw.module_name())
                if norm is None:       # the v path of a mixer without a separate value input
                    continue
                try:
                    std = norm.freeze(state.backend.all_sum(norm.stats.clone()))
                except RuntimeError as e:
                    raise RuntimeError(f"{sw.module_name()} at step {state.step}: {e}") from None
                row.update(layer=sw.layer, norm=sw.module_name(),
                           **{f"std_{k}" if k != "ordinary" else "std": float(v) for k, v in zip(KIND_NAMES, std)})
            else:
                for norm in norms.values():
                    norm.end_special(EOT if sw.group == "eot" else BOS)
            state.log(row)

    def on_checkpoint(self, state: TrainState) -> dict[str, Any]:
        """The switches done (a record: the state itself is in the norms' buffers)."""
        return {"done": [[s.step, s.group, s.layer] for s in self.schedule if s.step <= state.step]}

    def _check(self, norms: dict[str, RemovableNorm], step: int) -> None:
        for name, norm in norms.items():
            fake, special = expected_state(self.schedule, step, name)
            have = (bool(norm.fake), [bool(x) for x in norm.special])
            if have != (fake, special):
                raise RuntimeError(
                    f"model.norm.removal: at step {step} the schedule has {name} fake={fake}, EOT/BOS "
                    f"special={special}, but the model's state is fake={have[0]}, special={have[1]} "
                    "(init_from a run whose norms were already switched? start from a normed run, "
                    "or from the fine-tune's own checkpoint with resume)")


@register_callback("norm_removal")
def _factory(cfg: Any) -> Callback | None:
    removal = cfg.model.norm.removal
    return NormRemoval(removal_schedule(removal, cfg.model.n_layers)) if removal is not None else None
