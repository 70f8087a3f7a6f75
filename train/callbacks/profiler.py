"""`train.profile: {start, steps}`: a torch.profiler window over steps start+1 .. start+steps
(1-based), written as a Chrome trace per rank under RUN_DIR/profile/ (open it in Perfetto or
chrome://tracing)."""
from __future__ import annotations

from typing import Any

import torch

from train.callbacks import Callback, TrainState, register_callback


class ProfileWindow(Callback):
    def __init__(self, start: int, steps: int):
        self.start, self.steps = start, steps
        self.prof: torch.profiler.profile | None = None

    def on_step_start(self, state: TrainState) -> None:
        if state.step == self.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if state.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities, record_shapes=True, with_stack=False)
            self.prof.__enter__()

    def on_step_end(self, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.prof is not None and state.step >= self.start + self.steps:
            self._finish(state)

    def on_end(self, state: TrainState) -> None:
        if self.prof is not None:
            self._finish(state)

    def _finish(self, state: TrainState) -> None:
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if state.run is None:
            return
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out = state.run.path / "profile"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"trace-step{self.start + 1:08d}-rank{rank}.json"
        prof.export_chrome_trace(str(path))
        state.log({"kind": "event", "event": "profile", "step": state.step, "path": str(path),
                   "steps": [self.start + 1, state.step]})


@register_callback("profiler")
def _profiler(cfg: Any) -> ProfileWindow | None:
    p = cfg.train.profile
    return ProfileWindow(p.start, p.steps) if p.steps > 0 else None
