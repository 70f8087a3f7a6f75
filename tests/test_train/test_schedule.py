"""lr_factor: warmup, the four kinds' key values, and WSD decay branches started on resume."""
from __future__ import annotations

import math
from typing import Any

import pytest

from train.config import ScheduleConfig
from train.schedule import lr_factor, wsd_decay_start

KINDS = ["cosine", "linear", "constant", "wsd"]


def sched(**kw: Any) -> ScheduleConfig:
    s = ScheduleConfig(**kw)
    s.validate("optim.schedule")
    return s


@pytest.mark.parametrize("kind", KINDS)
def test_warmup_is_linear_from_one_over_warmup(kind: str) -> None:
    s = sched(kind=kind, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, 100, s) == pytest.approx(0.1)         # step 0 trains at lr / warmup, not 0
    for step in range(10):
        assert lr_factor(step, 100, s) == pytest.approx((step + 1) / 10)
    assert lr_factor(9, 100, s) == 1.0 and lr_factor(10, 100, s) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_no_warmup_starts_at_peak(kind: str) -> None:
    assert lr_factor(0, 100, sched(kind=kind, warmup=0)) == 1.0


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("min_lr_ratio", [0.0, 0.1, 1.0])
def test_decays_monotonically_to_min_ratio(kind: str, min_lr_ratio: float) -> None:
    s = sched(kind=kind, warmup=5, min_lr_ratio=min_lr_ratio)
    total = 50
    after = [lr_factor(step, total, s) for step in range(5, total + 1)]
    assert after[0] == pytest.approx(1.0)
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))
    assert all(min_lr_ratio - 1e-12 <= f <= 1.0 for f in after)
    assert lr_factor(total, total, s) == pytest.approx(min_lr_ratio)
    assert lr_factor(total + 7, total, s) == pytest.approx(min_lr_ratio)   # stays there past the end
    if min_lr_ratio < 1.0:
        assert lr_factor(total - 1, total, s) > min_lr_ratio                 # the last step still decays


def test_cosine_and_linear_shapes() -> None:
    m = 0.1
    cos, lin = sched(kind="cosine", warmup=10, min_lr_ratio=m), sched(kind="linear", warmup=10, min_lr_ratio=m)
    # Midpoint of the post-warmup span (step 60 of 110): both at (1 + m) / 2.
    assert lr_factor(60, 110, cos) == pytest.approx((1 + m) / 2)
    assert lr_factor(60, 110, lin) == pytest.approx((1 + m) / 2)
    # Quarter point: cosine m + (1-m)(1+cos(pi/4))/2, linear m + (1-m) * 0.75.
    assert lr_factor(35, 110, cos) == pytest.approx(m + (1 - m) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr_factor(35, 110, lin) == pytest.approx(m + (1 - m) * 0.75)


def test_constant_stays_at_peak() -> None:
    s = sched(kind="constant", warmup=3, min_lr_ratio=0.1)
    assert [lr_factor(step, 20, s) for step in range(3, 40)] == [1.0] * 37


def test_wsd_stable_then_linear_decay_over_decay_frac() -> None:
    s = sched(kind="wsd", warmup=10, decay_frac=0.2, min_lr_ratio=0.0)
    assert wsd_decay_start(100, s) == 80
    assert all(lr_factor(step, 100, s) == 1.0 for step in range(10, 81))
    assert lr_factor(90, 100, s) == pytest.approx(0.5)
    assert lr_factor(100, 100, s) == 0.0
    # decay_frac * steps that is not exact in binary still gives the intended start.
    assert wsd_decay_start(1000, sched(kind="wsd", decay_frac=0.1)) == 900


def test_wsd_decay_start_overrides_decay_frac() -> None:
    s = sched(kind="wsd", decay_frac=0.5, decay_start=70, min_lr_ratio=0.1)
    assert wsd_decay_start(100, s) == 70
    assert lr_factor(69, 100, s) == 1.0 and lr_factor(70, 100, s) == 1.0
    assert lr_factor(85, 100, s) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(100, 100, s) == pytest.approx(0.1)


@pytest.mark.parametrize("branch", [10, 123, 400, 599])
def test_wsd_decay_branch_from_any_stable_checkpoint(branch: int) -> None:
    """A stable-phase run resumed at `branch` with decay_start=branch and new steps decays from there.

    The factor is a pure function, so 'resuming with a new schedule' is just evaluating the new
    schedule: the steps already taken match it (all 1), and there is no jump at the branch.
    """
    stable = sched(kind="wsd", warmup=10, decay_frac=0.0, min_lr_ratio=0.05)   # never decays
    assert all(lr_factor(step, 1000, stable) == 1.0 for step in range(10, 1000))
    total = branch + 200
    branched = sched(kind="wsd", warmup=10, decay_start=branch, min_lr_ratio=0.05)
    for step in range(branch):                 # history before the branch is the same run
        assert lr_factor(step, total, branched) == lr_factor(step, 1000, stable)
    assert lr_factor(branch, total, branched) == 1.0
    decay = [lr_factor(step, total, branched) for step in range(branch, total + 1)]
    assert all(b < a for a, b in zip(decay, decay[1:]))
    assert decay[-1] == pytest.approx(0.05)
    # Linear: equal steps in between.
    assert lr_factor(branch + 100, total, branched) == pytest.approx(0.05 + 0.95 * 0.5)


def test_wsd_decay_start_inside_warmup_waits_for_warmup() -> None:
    s = sched(kind="wsd", warmup=20, decay_start=5, min_lr_ratio=0.0)
    assert lr_factor(19, 40, s) == 1.0
    assert lr_factor(20, 40, s) == 1.0
    assert lr_factor(30, 40, s) == pytest.approx(0.5)


def test_short_runs_and_bad_input() -> None:
    s = sched(kind="cosine", warmup=10, min_lr_ratio=0.2)
    assert lr_factor(4, 5, s) == pytest.approx(0.5)           # the whole run is warmup
    assert lr_factor(10, 5, s) == pytest.approx(0.2)          # past the end: min
    assert lr_factor(0, 1, sched(kind="linear")) == 1.0
    with pytest.raises(ValueError):
        lr_factor(-1, 10, s)
    with pytest.raises(ValueError):
        lr_factor(0, 0, s)
    bad = ScheduleConfig()
    bad.kind = "step"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="unknown schedule kind"):
        lr_factor(0, 10, bad)
