"""`ablate status RUN_DIR_OR_SWEEP_DIR`: where each run stands, from its run dir (and Slurm).

state: done (DONE), failed (FAILED, with its first line), running (the run-dir lock is held),
requeued (REQUEUE: stopped cleanly, waiting to continue), pending (launched, not started or
between segments) or new (nothing launched). Slurm's view (squeue) is added when available.
"""
from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from launch.slurm import job_ids
from launch.sweep import is_sweep_dir, sweep_run_dirs
from models.registry import ConfigError
from train.rundir import RunDir


def _locked(run: RunDir) -> bool:
    """Whether a process holds the run dir's lock (train/runlock.py flocks RUN_DIR/.lock)."""
    path = run.path / ".lock"
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


def slurm_state(job: str) -> str | None:
    """squeue's state of a job (None: Slurm unavailable, or the job left the queue)."""
    if shutil.which("squeue") is None:
        return None
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True)
    states = out.stdout.split() if out.returncode == 0 else []
    return states[0] if states else None


def run_status(path: str | Path) -> dict[str, Any]:
    run = RunDir(path)
    jobs = job_ids(run)
    if run.has("DONE"):
        state = "done"
    elif run.has("FAILED"):
        state = "failed"
    elif _locked(run):
        state = "running"
    elif run.has("REQUEUE"):
        state = "requeued"
    elif jobs or run.exists():
        state = "pending"
    else:
        state = "new"
    error = None
    if state == "failed":
        error = (run.marker("FAILED").read_text().splitlines() or [""])[0]
    train = run.read_metrics("train") if run.metrics_path.exists() else []
    val = run.read_metrics("val") if run.metrics_path.exists() else []
    job = jobs[-1] if jobs else None
    return {"run": str(run.path), "state": state, "error": error,
            "step": train[-1]["step"] if train else 0, "tokens": train[-1]["tokens"] if train else 0,
            "loss": train[-1]["loss"] if train else None, "val_loss": val[-1]["val_loss"] if val else None,
            "job": job, "slurm": slurm_state(job) if job and not job.startswith("local") else None}


def status(path: str | Path) -> list[dict[str, Any]]:
    """One row per run: the run dir itself, or every run of a sweep dir."""
    path = Path(path)
    if is_sweep_dir(path):
        return [run_status(d) for d in sweep_run_dirs(path)]
    if not (path / "config.yaml").exists():
        raise ConfigError("RUN_DIR_OR_SWEEP_DIR", f"{path} is neither a run dir (config.yaml) nor a sweep dir "
                          "(manifest.json)")
    return [run_status(path)]


def format_status(rows: list[dict[str, Any]]) -> str:
    def cell(v: Any, fmt: str = "") -> str:
        return "-" if v is None else format(v, fmt)

    lines = [f"{'run':<40} {'state':<9} {'step':>7} {'tokens':>11} {'loss':>8} {'val_loss':>8}  job (slurm)"]
    for r in rows:
        name = Path(r["run"]).name
        job = f"{r['job'] or '-'} ({r['slurm'] or '-'})"
        lines.append(f"{name:<40} {r['state']:<9} {r['step']:>7} {r['tokens']:>11,} {cell(r['loss'], '.4f'):>8} "
                     f"{cell(r['val_loss'], '.4f'):>8}  {job}")
        if r["error"]:
            lines.append(f"    {r['error']}")
    return "\n".join(lines)


def status_json(rows: list[dict[str, Any]]) -> str:
    return json.dumps(rows, indent=1)
