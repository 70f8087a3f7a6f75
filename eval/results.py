"""Result files `RUN_DIR/eval/step-XXXXXXXX.<hash8>.json` and `eval` rows in metrics.jsonl.

hash8 is the first 8 hex digits of the sha256 of the settings that change the numbers: task
names, limit, num_fewshot, task versions and the fingerprints of local task data. A result
with the same (step, hash8) is reused, never recomputed; different settings get another file.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from train.rundir import RunDir, atomic_write, step_name


def settings_hash(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def result_path(run: RunDir, step: int, hash8: str) -> Path:
    return run.path / "eval" / f"{step_name(step)}.{hash8}.json"


def load_result(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def save_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(result, indent=2, sort_keys=True) + "\n")


def _num(v: Any) -> float | None:
    """lm-eval writes 'N/A' for missing stderrs; JSON has no NaN."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def metrics_from_lm_eval(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float | None]]]:
    """{task: {metric: {value, stderr}}} from lm-eval's results (and groups) dicts.

    lm-eval keys are "metric,filter"; the default filter "none" is dropped from the name.
    """
    out: dict[str, dict[str, dict[str, float | None]]] = {}
    for section in ("results", "groups"):
        for task, entries in (results.get(section) or {}).items():
            for key, value in entries.items():
                if "," not in key or "_stderr," in key:
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else key
                out.setdefault(task, {})[name] = {"value": _num(value),
                                                  "stderr": _num(entries.get(f"{metric}_stderr,{filt}"))}
    return out


def eval_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"kind": "eval", "step": result["step"], "task": task, "metric": metric, "value": m["value"],
             "stderr": m["stderr"], "hash8": result["hash8"]}
            for task, metrics in sorted(result["metrics"].items()) for metric, m in sorted(metrics.items())]


def log_missing_rows(run: RunDir, result: dict[str, Any], log: Any = None) -> int:
    """Append the result's eval rows not yet in metrics.jsonl (a resume may have dropped them)."""
    have = {(r.get("step"), r.get("hash8"), r.get("task"), r.get("metric")) for r in run.read_metrics("eval")}
    write = log or run.log
    n = 0
    for row in eval_rows(result):
        if (row["step"], row["hash8"], row["task"], row["metric"]) not in have:
            write(row)
            n += 1
    return n


def format_result(result: dict[str, Any]) -> str:
    """The table `ablate eval` prints."""
    lines = [f"step {result['step']}  ({result['path'] if 'path' in result else result['hash8']})"
             f"{'  [reused]' if result.get('reused') else ''}"]
    for task, metrics in sorted(result["metrics"].items()):
        shot = result.get("n_shot", {}).get(task)
        n = (result.get("n_samples", {}).get(task) or {}).get("effective")
        head = f"  {task}" + (f" ({shot}-shot" if shot is not None else " (") + (f", n={n})" if n else ")")
        lines.append(head.replace(" ()", ""))
        for metric, m in sorted(metrics.items()):
            v = "n/a" if m["value"] is None else f"{m['value']:.4f}"
            err = f" ± {m['stderr']:.4f}" if m["stderr"] is not None else ""
            lines.append(f"    {metric:<18} {v}{err}")
    return "\n".join(lines)
