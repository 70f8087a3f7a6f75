"""Per-optimizer-group training statistics (`train.log_group_norms`): the gradient norm of each
group (after clipping) and the RMS of its update relative to the RMS of its parameters.

The update ratio ||Δθ|| / ||θ|| per group is what muP / CompleteP coordinate checks and LR
studies look at (a group that barely moves or explodes shows up at once). Both figures come
from one device read on log steps; nothing runs on other steps. Under FSDP2 the gradients
and parameters are DTensor shards: their squared norms are summed across ranks first.
"""
from __future__ import annotations

import torch


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm, as a plain fp64 tensor (a DTensor's is reduced across its mesh)."""
    sq = t.detach().double().pow(2).sum()
    return sq.full_tensor() if hasattr(sq, "full_tensor") else sq


class GroupStats:
    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._grad_sq: torch.Tensor | None = None
        self._before: list[list[torch.Tensor]] | None = None

    def before_step(self) -> None:
        """Gradient norms and a copy of the parameters, just before the optimizer step."""
        groups = self.optimizer.param_groups
        self._grad_sq = torch.stack([sum((_sq_norm(p.grad) for p in g["params"] if p.grad is not None),
                                         torch.zeros((), dtype=torch.float64, device=_device(g)))
                                     for g in groups])
        self._before = [[p.detach().clone() for p in g["params"]] for g in groups]

    def after_step(self) -> dict[str, float]:
        """{grad_norm/<group>: ..., update_ratio/<group>: ...} for the step just taken."""
        if self._before is None:
            return {}
        groups = self.optimizer.param_groups
        upd, par = [], []
        for g, before in zip(groups, self._before):
            zero = torch.zeros((), dtype=torch.float64, device=_device(g))
            upd.append(sum((_sq_norm(p - b) for p, b in zip(g["params"], before)), zero))
            par.append(sum((_sq_norm(p) for p in g["params"]), zero))
        values = torch.stack([self._grad_sq.to(upd[0]), torch.stack(upd), torch.stack(par)]).tolist()
        self._before = self._grad_sq = None
        out: dict[str, float] = {}
        for i, g in enumerate(groups):
            name = g.get("name", str(i))
            out[f"grad_norm/{name}"] = values[0][i] ** 0.5
            out[f"update_ratio/{name}"] = (values[1][i] / values[2][i]) ** 0.5 if values[2][i] > 0 else 0.0
        return out


def _device(group: dict) -> torch.device:
    p = group["params"][0]
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.device
