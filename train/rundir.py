"""The run directory: the contract between train, eval, compare and launch (README: "Where results go").

Everything a later command needs is a file here: the resolved config, metrics rows, complete
checkpoints and the state markers STOP / REQUEUE / DONE / FAILED.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any


MARKERS = ("STOP", "REQUEUE", "DONE", "FAILED")
REPO_ROOT = Path(__file__).resolve().parents[1]


def step_name(step: int) -> str:
    return f"step-{step:08d}"


def code_version() -> dict[str, Any]:
    """git sha and dirty flag of the source tree this process runs from: a launched job runs a
    snapshot (RUN_DIR/code/, launch/slurm.py) whose version was written beside it at launch;
    null outside git."""
    snapshot = REPO_ROOT / "code_version.json"
    if snapshot.is_file():
        try:
            return {**json.loads(snapshot.read_text()), "snapshot": str(REPO_ROOT)}
        except (OSError, ValueError):
            pass
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    sha = git("rev-parse", "HEAD")
    if sha is None:
        return {"git_sha": None, "dirty": None}
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_sha": sha, "dirty": bool(status)}


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _row(line: str) -> dict[str, Any] | None:
    """A metrics line as a row: a JSON object with an integer step, else None."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row.get("step"), bool):
        return None
    return row


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ------------------------------------------------------------------ layout
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    def exists(self) -> bool:
        return self.config_path.is_file()

    # ------------------------------------------------------------------ config
    def read_config(self) -> dict[str, Any]:
        """The saved config as a mapping; a file that does not parse as one is a ConfigError
        naming it (exit 2), not a traceback."""
        from models.registry import ConfigError
        from train.config import read_yaml
        try:
            return read_yaml(self.config_path)
        except ConfigError as e:
            raise ConfigError("RUN_DIR", f"{self.config_path} is damaged: {e.message}") from None

    def write_config(self, text: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.config_path, text)

    # ------------------------------------------------------------------ markers
    def marker(self, name: str) -> Path:
        assert name in MARKERS, name
        return self.path / name

    def has(self, name: str) -> bool:
        return self.marker(name).exists()

    def set_marker(self, name: str, text: str = "") -> None:
        atomic_write(self.marker(name), text + ("\n" if text and not text.endswith("\n") else ""))

    def clear_marker(self, *names: str) -> None:
        for name in names:
            self.marker(name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ metrics
    def log(self, row: dict[str, Any]) -> None:
        """Append one row; non-finite floats become null (NaN is not JSON)."""
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")

    def read_metrics(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The rows (objects with an integer step); a line cut short or not a row is skipped."""
        if not self.metrics_path.exists():
            return []
        rows = [r for r in map(_row, self.metrics_path.read_text().splitlines()) if r is not None]
        return [r for r in rows if kind is None or r.get("kind") == kind]

    def truncate_metrics(self, step: int) -> None:
        """Drop rows with a step after `step` (resume), so every step appears once."""
        if not self.metrics_path.exists():
            return
        keep, aside = [], []
        for line in self.metrics_path.read_text().splitlines():
            if not line.strip():
                continue
            row = _row(line)
            if row is None:                    # cut short by a kill, or not a row: set aside, not lost
                aside.append(line)
            elif row["step"] <= step:
                keep.append(line)
        if aside:
            with open(self.path / "metrics.unreadable.jsonl", "a") as f:
                f.write("".join(line + "\n" for line in aside))
        atomic_write(self.metrics_path, "".join(line + "\n" for line in keep))
