"""Learning-rate schedules: a multiplier on every group's peak lr (`group["base_lr"]`).

`lr_factor(step, total_steps, sched)` is a pure function of its arguments, with no state to
checkpoint. That is what lets a resumed run change the schedule (`optim.schedule.*` and
`train.steps` may differ on resume, see `train.config.RESUMABLE_PREFIXES`): e.g. a WSD run saved
in its stable phase is branched into a decay by resuming it with a new `decay_start` or `steps`,
and the factor at every later step is simply recomputed from the new schedule.

Steps are 0-based optimizer steps: step `s` is the (s+1)-th update. Notation used below:
W = sched.warmup, T = total_steps, m = sched.min_lr_ratio.

Warmup (every kind): for s < W, factor = (s + 1) / W. Linear from 1/W (so step 0 already trains,
at lr / W, instead of wasting a step at lr 0) up to exactly 1 at s = W - 1.

After warmup, with progress p = clamp((s - W) / (T - W), 0, 1) (p = 1 when T <= W):
  cosine:   m + (1 - m) * (1 + cos(pi * p)) / 2     1 at s = W, m at s = T
  linear:   m + (1 - m) * (1 - p)                   1 at s = W, m at s = T
  constant: 1
  wsd:      1 while s < D (the stable phase); then linear decay
            m + (1 - m) * (1 - q),  q = clamp((s - D) / (T - D), 0, 1)   (q = 1 when T <= D)
            which is 1 at s = D and m at s = T. The decay start is
            D = sched.decay_start if set, else T - round(sched.decay_frac * T).
            If D < W the decay starts at W instead (warmup comes first).
Past T every kind but constant stays at m. The factor is in [m, 1] after warmup and in
(0, 1] during it.
"""
from __future__ import annotations

import math

from train.config import ScheduleConfig

KINDS = ("cosine", "linear", "constant", "wsd")


def wsd_decay_start(total_steps: int, sched: ScheduleConfig) -> int:
    """First step of the WSD decay: `decay_start` if set, else the last `decay_frac` of T."""
    if sched.decay_start is not None:
        return int(sched.decay_start)
    return total_steps - int(round(sched.decay_frac * total_steps))


def _ramp_down(step: int, start: int, end: int, min_ratio: float) -> float:
    """Linear from 1 at `start` to `min_ratio` at `end`, clamped outside [start, end]."""
    if end <= start:
        return min_ratio if step >= start else 1.0
    p = min(max((step - start) / (end - start), 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * (1.0 - p)


def lr_factor(step: int, total_steps: int, sched: ScheduleConfig) -> float:
    """The lr multiplier of 0-based `step` in a run of `total_steps` (formulas: module docstring)."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if sched.kind not in KINDS:
        raise ValueError(f"unknown schedule kind {sched.kind!r} (known: {', '.join(KINDS)})")
    warmup, m = sched.warmup, sched.min_lr_ratio
    if step < warmup:
        return (step + 1) / warmup
    if sched.kind == "constant":
        return 1.0
    if sched.kind == "wsd":
        return _ramp_down(step, max(wsd_decay_start(total_steps, sched), warmup), total_steps, m)
    if total_steps <= warmup:
        return m
    p = min((step - warmup) / (total_steps - warmup), 1.0)
    if sched.kind == "cosine":
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))
    return m + (1.0 - m) * (1.0 - p)  # linear
