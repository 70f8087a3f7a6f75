"""Statistics over seeds: mean +- standard error, t-based 95% intervals, paired and Welch tests.

Seeds are few (often 3), so every number carries its n, intervals use the t distribution (not
1.96), and a single seed gets no error bar at all. Rank tests are not run: with n shared seeds
the exact two-sided Wilcoxon signed-rank test cannot go below 2 / 2^n (0.25 at n = 3), so below
n = 6 it cannot reach p < 0.05 whatever the data; `rank_test_note` says so instead.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Iterable, Iterator

import numpy as np
from scipy import stats as sps

LEVEL = 0.95            # every interval in the report
RANK_TEST_MIN_N = 6     # the smallest n at which an exact two-sided Wilcoxon can give p < 0.05


def _finite(x: Any) -> float | None:
    """x as a float when it is a finite number, else None (NaN and inf are 'no value')."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def t_interval(mean: float, se: float, df: float) -> list[float]:
    """mean +- t_{0.975, df} * se."""
    half = float(sps.t.ppf(0.5 + LEVEL / 2, df)) * se
    return [mean - half, mean + half]


def summarize(values: Iterable[Any]) -> dict[str, Any]:
    """n, mean, standard error (ddof 1) and 95% t interval of the finite values; sem and ci are
    None below two values (one seed: no error bar claimed)."""
    vals = [v for v in (_finite(x) for x in values) if v is not None]
    out: dict[str, Any] = {"n": len(vals), "mean": None, "sem": None, "ci95": None, "values": vals}
    if not vals:
        return out
    a = np.asarray(vals, dtype=np.float64)
    out["mean"] = float(a.mean())
    if len(a) >= 2:
        out["sem"] = float(a.std(ddof=1) / math.sqrt(len(a)))
        out["ci95"] = t_interval(out["mean"], out["sem"], len(a) - 1)
    return out


@contextlib.contextmanager
def _exact_ties_quiet() -> Iterator[None]:
    """scipy warns of precision loss when one side's values are identical (an accuracy of 518/4096
    for both seeds); that side's variance is then exactly 0, which the tests handle, so the
    warning is only noise on the console."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Precision loss occurred", category=RuntimeWarning)
        yield


def paired(a: dict[Any, float], b: dict[Any, float]) -> dict[str, Any] | None:
    """a - b over the keys (seeds) both have: mean difference, its standard error, 95% t interval
    (n - 1 degrees of freedom) and the paired t-test (scipy.stats.ttest_rel). None below two
    shared seeds. p is None when the differences have no spread (the t statistic is undefined)."""
    keys = sorted((k for k in a if k in b and _finite(a[k]) is not None and _finite(b[k]) is not None), key=str)
    if len(keys) < 2:
        return None
    x = np.asarray([a[k] for k in keys], dtype=np.float64)
    y = np.asarray([b[k] for k in keys], dtype=np.float64)
    d = x - y
    n = len(d)
    se = float(d.std(ddof=1) / math.sqrt(n))
    mean = float(d.mean())
    t, p = (None, None)
    if se > 0:
        with _exact_ties_quiet():
            res = sps.ttest_rel(x, y)
        t, p = _finite(res.statistic), _finite(res.pvalue)
    ci = t_interval(mean, se, n - 1) if se > 0 else [mean, mean]
    return {"n": n, "seeds": keys, "diff": mean, "sem": se, "ci95": ci, "t": t, "p": p, "df": n - 1}


def welch(a: list[float], b: list[float]) -> dict[str, Any] | None:
    """mean(a) - mean(b) with Welch's standard error sqrt(s_a^2/n_a + s_b^2/n_b), the
    Welch-Satterthwaite degrees of freedom, its 95% t interval and Welch's t-test
    (scipy.stats.ttest_ind, equal_var=False). None unless both sides have two values."""
    x = np.asarray([v for v in map(_finite, a) if v is not None], dtype=np.float64)
    y = np.asarray([v for v in map(_finite, b) if v is not None], dtype=np.float64)
    if len(x) < 2 or len(y) < 2:
        return None
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    se = math.sqrt(va + vb)
    mean = float(x.mean() - y.mean())
    if se == 0:
        return {"n": [len(x), len(y)], "diff": mean, "sem": 0.0, "ci95": [mean, mean], "t": None, "p": None, "df": None}
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))
    with _exact_ties_quiet():
        res = sps.ttest_ind(x, y, equal_var=False)
    return {"n": [len(x), len(y)], "diff": mean, "sem": se, "ci95": t_interval(mean, se, df),
            "t": _finite(res.statistic), "p": _finite(res.pvalue), "df": float(df)}


def wilcoxon_min_p(n: int) -> float:
    """The smallest p an exact two-sided Wilcoxon signed-rank test can give with n pairs: all
    signs alike is 1 of 2^n sign patterns, doubled for two sides."""
    return min(1.0, 2.0 / 2 ** n)


def rank_test_note(n: int) -> str | None:
    """Why no rank test is reported with n < 6 shared seeds (None from 6 on)."""
    if n >= RANK_TEST_MIN_N:
        return None
    at3 = "" if n == 3 else " (0.25 at n = 3)"
    return (f"with n = {n} shared seeds a rank test cannot reach p < 0.05: the exact two-sided Wilcoxon "
            f"signed-rank minimum p is 2 / 2^n = {wilcoxon_min_p(n):.3g}{at3}; it takes {RANK_TEST_MIN_N} seeds")
