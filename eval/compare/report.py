"""The numbers of a comparison report: per-arm summaries over seeds, each arm against its
baseline, the grid's best points, and the messages a reader must see before trusting a number
(unfinished runs, single seeds, mismatched token budgets, missing or differing evaluations).

`build(paths, metric, at, baseline)` returns a `Comparison`; its `data` is what
`--format json` writes, and the markdown / HTML writers and the plots read the same object.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.compare import stats
from eval.compare.arms import Arm, group
from eval.compare.metric import Metric
from eval.compare.runs import At, Point, Run, Sweep, load_inputs, point
from models.registry import ConfigError

# Grid keys that change a run's compute: a sweep over them gets the metric-vs-FLOPs plot.
COMPUTE_KEYS = ("model.d_model", "model.n_layers", "model.ffn.hidden", "model.memory.n_keys", "train.steps")
MODEL_COLUMNS = ("params", "non_embedding", "memory_params", "flops_per_token", "tokens_per_s", "mfu", "mem_gb")


@dataclass
class Comparison:
    arms: list[Arm]
    points: dict[Path, Point]
    metric: Metric
    at: At
    sweeps: list[Sweep]
    baseline_of: dict[str, str | None]         # arm name -> the arm it is compared with
    messages: list[dict[str, str]] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def note(self, kind: str, text: str) -> None:
        self.messages.append({"kind": kind, "text": text})

    def pts(self, arm: Arm) -> list[Point]:
        return [self.points[r.path] for r in arm.runs]

    @property
    def grid_keys(self) -> list[str]:
        keys: list[str] = []
        for s in self.sweeps:
            keys += [k for k in s.grid if k not in keys and len(s.grid[k]) > 1]
        return keys


# ----------------------------------------------------------------------------- baseline
def baselines(arms: list[Arm], sweeps: list[Sweep], wanted: str | None) -> tuple[str, dict[str, str | None]]:
    """(the baseline's name, {arm: its baseline arm}). A full arm name compares every arm with
    that one; a manifest arm name (the default: the first arm of the first sweep) compares each
    grid cell with the baseline arm's run of the same cell. Ad-hoc runs: the first arm."""
    names = [a.name for a in arms]
    if wanted is not None and wanted in names:
        return wanted, {a.name: (None if a.name == wanted else wanted) for a in arms}
    manifest_arms = [a.arm for a in arms if a.cell or a.runs[0].entry]
    if wanted is not None and wanted not in manifest_arms:
        raise ConfigError("--baseline", f"no arm named {wanted!r}; arms: {', '.join(names)}")
    base = wanted
    if base is None:
        base = next((s.arms[0] for s in sweeps if s.arms and s.arms[0] in manifest_arms), None)
    if base is None:
        return names[0], {a.name: (None if a is arms[0] else names[0]) for a in arms}
    out: dict[str, str | None] = {}
    for a in arms:
        match = next((b for b in arms if b.arm == base and b.cell == a.cell), None)
        out[a.name] = None if match is None or match is a else match.name
    return base, out


# ----------------------------------------------------------------------------- comparisons
def _by_pair(arm: Arm, values: list[float | None]) -> tuple[dict[Any, float], list[Any]]:
    """{pair key: value} (runs sharing a seed averaged) and the keys that were duplicated."""
    acc: dict[Any, list[float]] = {}
    for r, v in zip(arm.runs, values):
        if v is not None:
            acc.setdefault(r.pair_key, []).append(v)
    return {k: sum(v) / len(v) for k, v in acc.items()}, [k for k, v in acc.items() if len(v) > 1]


def compare_arms(arm: Arm, base: Arm, a_vals: list[float | None], b_vals: list[float | None],
                 lower_is_better: bool) -> dict[str, Any]:
    """`arm` - `base` in the metric: the difference of means with a 95% interval (paired when
    every run has its pair, at least two; else Welch's, over every run), the paired t-test over
    the shared seeds, Welch's test, and the notes a reader needs to weigh them."""
    a, _ = _by_pair(arm, a_vals)
    b, _ = _by_pair(base, b_vals)
    pa = stats.paired(a, b)
    wl = stats.welch([v for v in a_vals if v is not None], [v for v in b_vals if v is not None])
    sa, sb = stats.summarize(a_vals), stats.summarize(b_vals)
    diff = sa["mean"] - sb["mean"] if sa["n"] and sb["n"] else None
    shared = len([k for k in a if k in b])
    notes: list[str] = []
    if sa["n"] < 2 or sb["n"] < 2:
        notes.append("single seed: no interval or test")
    if pa is not None:
        notes.append(stats.rank_test_note(pa["n"]) or "")
        if pa["p"] is None:
            notes.append("the paired differences are all equal: no t statistic")
    if shared < max(sa["n"], sb["n"]):
        notes.append(f"seeds not shared ({shared} shared of {sa['n']} and {sb['n']} runs): "
                     + ("Welch's test uses every run; the paired test only the shared seeds" if pa
                        else "no paired test; Welch's test treats the arms as independent samples"))
    all_paired = pa is not None and shared == len(a) == len(b)    # then pa's diff is `diff`
    method, ci = (("paired", pa["ci95"]) if all_paired else ("welch", wl["ci95"]) if wl is not None
                  else (None, None))
    better = None                                    # the better arm, when the interval excludes 0
    if ci is not None and (ci[0] > 0 or ci[1] < 0):
        better = arm.name if (ci[1] < 0) == lower_is_better else base.name
    return {"arm": arm.name, "baseline": base.name, "diff": diff, "ci95": ci, "method": method,
            "n": [sa["n"], sb["n"]], "shared_seeds": shared, "paired": pa, "welch": wl,
            "better": better, "notes": [n for n in notes if n]}


# ----------------------------------------------------------------------------- per arm
def _eval_settings(runs: list[Run]) -> dict[str, Any]:
    """{hash8: settings} from the runs' eval result files."""
    from eval.results import load_result
    out: dict[str, Any] = {}
    for r in runs:
        for f in sorted((r.path / "eval").glob("step-*.json")):
            res = load_result(f)
            if isinstance(res, dict) and res.get("hash8") and res["hash8"] not in out:
                out[res["hash8"]] = res.get("settings")
    return out


def arm_numbers(c: Comparison, arm: Arm) -> dict[str, Any]:
    pts = c.pts(arm)
    sets = list(dict.fromkeys(s for p in pts for s in p.val))
    val = {}
    for s in sets:
        fields = list(dict.fromkeys(k for p in pts for k, v in p.val.get(s, {}).items()
                                    if k.startswith("val_") and isinstance(v, (int, float))))
        val[s] = {f: stats.summarize(p.val.get(s, {}).get(f) for p in pts) for f in fields}
    evals = []
    for key in sorted({k for p in pts for k in p.eval}):
        evals.append({"task": key[0], "metric": key[1], "hash8": key[2],
                      **stats.summarize((p.eval.get(key) or {}).get("value") for p in pts)})
    series = list(dict.fromkeys(s for p in pts for s in p.probes))
    probes = {}
    for s in series:
        layers = [p.probes[s]["layers"] for p in pts if s in p.probes]
        n = max(map(len, layers), default=0)
        probes[s] = {"mean": stats.summarize(p.probes[s].get("mean") for p in pts if s in p.probes),
                     "layers": [stats.summarize(l[i] if i < len(l) else None for l in layers) for i in range(n)]}
    flops = [p.model["flops_per_token"] * p.tokens if p.model.get("flops_per_token") and p.tokens else None
             for p in pts]
    return {"name": arm.name, "arm": arm.arm, "cell": arm.cell, "differs": arm.differs,
            "runs": [{"dir": str(r.path), "seed": r.seed, "status": r.status, "status_text": r.status_text,
                      "step": p.step, "tokens": p.tokens, "planned_steps": r.planned_steps}
                     for r, p in zip(arm.runs, pts)],
            "metric": stats.summarize(c.metric.value(p) for p in pts),
            "tokens": stats.summarize(p.tokens for p in pts),
            "flops": stats.summarize(flops),
            "val": val, "eval": evals,
            "model": {k: stats.summarize(p.model.get(k) for p in pts) for k in MODEL_COLUMNS},
            "probes": probes}


# ----------------------------------------------------------------------------- messages
def _tokens(v: Any) -> str:
    return "?" if v is None else f"{int(v):,}"


def check(c: Comparison, settings: dict[str, Any]) -> None:
    """Every condition that weakens a conclusion, as a message (the report lists them first)."""
    for arm in c.arms:
        for r, p in zip(arm.runs, c.pts(arm)):
            if r.status != "done":
                how = {"requeue": f"stopped for requeue ({r.status_text})", "failed": f"failed ({r.status_text})",
                       "unfinished": "no DONE marker (still running, or killed)"}[r.status]
                c.note("unfinished", f"arm {arm.name}: run {r.label} is unfinished: {how}; its numbers are at "
                                     f"step {p.step} of {r.planned_steps}")
            if c.metric.value(p) is None:
                c.note("missing_metric", f"arm {arm.name}: run {r.label} has no {c.metric.label} at {c.at}")
        if len(arm.runs) == 1:
            c.note("single_seed", f"arm {arm.name} has a single seed: no error bars or tests are claimed for it")
        _, dup = _by_pair(arm, [c.metric.value(p) for p in c.pts(arm)])
        if dup:
            c.note("duplicate_seed", f"arm {arm.name}: several runs share seed {', '.join(map(str, dup))}: "
                                     "the paired test uses their mean")
        base = c.data["baseline"]
        if c.baseline_of.get(arm.name) is None and base not in (arm.name, arm.arm):
            c.note("no_baseline", f"arm {arm.name}: no run of the baseline {base} at the same grid values")
    # token budgets: planned (train.steps x global_batch x seq_len) and at the chosen point
    planned = {a.name: sorted({r.planned_steps * r.tokens_per_step for r in a.runs if r.planned_steps}) for a in c.arms}
    if len({b for v in planned.values() for b in v}) > 1:
        c.note("token_budget", "arms have different token budgets (train.steps x global_batch x seq_len): "
               + "; ".join(f"{n} {'/'.join(map(_tokens, v))}" for n, v in planned.items())
               + ": the comparison mixes budgets (--at tokens=N compares at one)")
    at = {a.name: sorted({p.tokens for p in c.pts(a) if p.tokens is not None}) for a in c.arms}
    if len({t for v in at.values() for t in v}) > 1:
        c.note("token_budget", f"the runs are at different token counts at {c.at}: "
               + "; ".join(f"{n} {' to '.join(map(_tokens, (v[0], v[-1]) if len(v) > 1 else v)) or '?'}"
                           for n, v in at.items()))
    # evaluations: settings that differ between arms, and results some runs lack
    by_tm: dict[tuple[str, str], dict[str, set[str]]] = {}
    for arm in c.arms:
        for p in c.pts(arm):
            for t, m, h in p.eval:
                by_tm.setdefault((t, m), {}).setdefault(arm.name, set()).add(h)
    for (t, m), per_arm in sorted(by_tm.items()):
        hashes = {frozenset(v) for v in per_arm.values()}
        if len(hashes) > 1:
            all_h = sorted(set().union(*per_arm.values()))
            c.note("eval_settings", f"{t}/{m}: arms differ in lm-eval settings ("
                   + "; ".join(f"{n}: {', '.join(sorted(v))}" for n, v in per_arm.items())
                   + f"){_settings_diff(all_h, settings)}: numbers under different hashes are not comparable")
        for arm in c.arms:
            mine = per_arm.get(arm.name, set())
            if not mine:
                c.note("missing_eval", f"arm {arm.name} has no {t}/{m} evaluation at {c.at}")
                continue
            for h in sorted(mine):
                lacking = [r.label for r, p in zip(arm.runs, c.pts(arm)) if (t, m, h) not in p.eval]
                if lacking:
                    c.note("missing_eval", f"arm {arm.name}: {len(lacking)} of {len(arm.runs)} runs lack "
                                           f"{t}/{m} [{h}] at {c.at}: {', '.join(lacking)}")


def _settings_diff(hashes: list[str], settings: dict[str, Any]) -> str:
    known = [settings[h] for h in hashes if isinstance(settings.get(h), dict)]
    if len(known) < 2:
        return ""
    keys = sorted({k for s in known for k in s if len({json.dumps(x.get(k), sort_keys=True, default=str)
                                                       for x in known}) > 1})
    return f"; they differ in {', '.join(keys)}" if keys else ""


# ----------------------------------------------------------------------------- grid
def grid_lines(c: Comparison, key: str) -> list[dict[str, Any]]:
    """The metric against one grid key: a line per (arm, values of the other grid keys), its
    points in grid order and its best point (lowest or highest mean, by the metric)."""
    lines: dict[str, dict[str, Any]] = {}
    for arm in c.arms:
        if key not in arm.cell:
            continue
        fixed = {k: v for k, v in arm.cell.items() if k != key}
        label = arm.arm + "".join(f", {k.split('.')[-1]}={v}" for k, v in fixed.items())
        line = lines.setdefault(label, {"label": label, "arm": arm.arm, "fixed": fixed, "points": []})
        line["points"].append({"x": arm.cell[key], "arm": arm.name, **c.data["arms"][arm.name]["metric"]})
    for line in lines.values():
        order = {json.dumps(v, default=str): i for i, v in enumerate(_grid_values(c, key))}
        line["points"].sort(key=lambda pt: order.get(json.dumps(pt["x"], default=str), len(order)))
        scored = [pt for pt in line["points"] if pt["mean"] is not None]
        pick = min if c.metric.lower_is_better else max
        line["best"] = pick(scored, key=lambda pt: pt["mean"])["x"] if scored else None
    return list(lines.values())


def _grid_values(c: Comparison, key: str) -> list[Any]:
    for s in c.sweeps:
        if key in s.grid:
            return list(s.grid[key])
    return []


def compute_lines(c: Comparison) -> list[dict[str, Any]]:
    """The metric against FLOPs (FLOPs/token x tokens at the point) across the compute keys of
    the grid: a line per (arm, values of the other grid keys)."""
    ckeys = [k for k in c.grid_keys if k in COMPUTE_KEYS]
    if not ckeys:
        return []
    lines: dict[str, dict[str, Any]] = {}
    for arm in c.arms:
        if not arm.cell:
            continue
        fixed = {k: v for k, v in arm.cell.items() if k not in ckeys}
        label = arm.arm + "".join(f", {k.split('.')[-1]}={v}" for k, v in fixed.items())
        d = c.data["arms"][arm.name]
        lines.setdefault(label, {"label": label, "points": []})["points"].append(
            {"flops": d["flops"]["mean"], "size": {k: arm.cell.get(k) for k in ckeys}, "arm": arm.name, **d["metric"]})
    for line in lines.values():
        line["points"].sort(key=lambda pt: pt["flops"] or 0)
    return list(lines.values())


# ----------------------------------------------------------------------------- build
def build(paths: list[str | Path], metric: str = "val_loss", at: str | At = "final",
          baseline: str | None = None) -> Comparison:
    """Read the runs, group them into arms and compute every number of the report."""
    runs, sweeps, missing = load_inputs(paths)
    at = At.parse(at) if isinstance(at, str) else at
    arms = group(runs)
    points = {r.path: point(r, at) for r in runs}
    m, note = Metric.parse(metric).resolve(list(points.values()))
    base, baseline_of = baselines(arms, sweeps, baseline)
    c = Comparison(arms, points, m, at, sweeps, baseline_of)
    for text in missing:
        c.note("missing_run", text)
    if note:
        c.note("metric", note)
    settings = _eval_settings(runs)
    c.data = {"metric": m.spec, "metric_label": m.label, "lower_is_better": m.lower_is_better, "at": str(at),
              "baseline": base, "inputs": [str(p) for p in paths], "sweeps": [s.name for s in sweeps],
              "arms": {}, "comparisons": [], "eval_settings": settings, "grid": {}, "compute": []}
    for arm in arms:
        c.data["arms"][arm.name] = arm_numbers(c, arm)
    by_name = {a.name: a for a in arms}
    for arm in arms:
        other = baseline_of.get(arm.name)
        if other is not None:
            c.data["comparisons"].append(compare_arms(
                arm, by_name[other], [m.value(p) for p in c.pts(arm)], [m.value(p) for p in c.pts(by_name[other])],
                m.lower_is_better))
    for key in c.grid_keys:
        c.data["grid"][key] = grid_lines(c, key)
    c.data["compute"] = compute_lines(c)
    check(c, settings)
    c.data["messages"] = c.messages
    return c
