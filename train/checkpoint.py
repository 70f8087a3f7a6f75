"""Atomic checkpoints in the torch.distributed.checkpoint (DCP) format.

A checkpoint is `checkpoints/step-XXXXXXXX/`: the DCP files of {"model", "optim"} plus
`trainer_state.pt` (step, data position, RNG states, ...). It is written under a temporary name,
renamed, and only then given its COMPLETE marker; resume considers complete ones only, so a
crash or a second signal at any point leaves the previous checkpoint as the newest complete one.
DCP needs no process group, so the distributed backends reuse this format unchanged.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from train.rundir import step_name

COMPLETE = "COMPLETE"
# Without a process group DCP warns that it assumes a single process: that is the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
TRAINER_STATE = "trainer_state.pt"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-"):
        return None
    try:
        return int(name[5:])
    except ValueError:
        return None


def complete_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not ckpt_root.is_dir():
        return []
    out = []
    for p in ckpt_root.iterdir():
        step = _step_of(p)
        if step is not None and p.is_dir() and (p / COMPLETE).exists():
            out.append((step, p))
    return sorted(out)


def latest_checkpoint(ckpt_root: Path) -> tuple[int, Path] | None:
    ckpts = complete_checkpoints(ckpt_root)
    return ckpts[-1] if ckpts else None


def find_checkpoint(ckpt_root: Path, step: int | str | None = None) -> tuple[int, Path]:
    """A complete checkpoint by step ('latest' or None for the newest). Raises FileNotFoundError."""
    ckpts = complete_checkpoints(ckpt_root)
    if not ckpts:
        raise FileNotFoundError(f"no complete checkpoint under {ckpt_root}")
    if step in (None, "latest"):
        return ckpts[-1]
    for s, p in ckpts:
        if s == int(step):
            return s, p
    raise FileNotFoundError(f"no complete checkpoint for step {step} under {ckpt_root} "
                            f"(have: {', '.join(str(s) for s, _ in ckpts)})")


def clean_partial(ckpt_root: Path) -> None:
    """Remove leftovers of interrupted saves (temporary dirs, renamed dirs without COMPLETE)."""
    if not ckpt_root.is_dir():
        return
    for p in ckpt_root.iterdir():
        if p.name.startswith(".tmp-") or (_step_of(p) is not None and not (p / COMPLETE).exists()):
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any]) -> dict[str, Any]:
    """Write checkpoint `step` atomically; returns {"seconds", "bytes", "path"} for the event row."""
    t0 = time.perf_counter()
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / step_name(step)
    if (final / COMPLETE).exists():
        return {"seconds": 0.0, "bytes": _size(final), "path": str(final), "existed": True}
    tmp = ckpt_root / f".tmp-{step_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(tmp))
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if final.exists():                      # renamed earlier but never marked complete
        shutil.rmtree(final)
    os.rename(tmp, final)
    (final / COMPLETE).write_text(f"{step}\n")
    _fsync_dir(ckpt_root)
    return {"seconds": time.perf_counter() - t0, "bytes": _size(final), "path": str(final)}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load model (and optimizer) state in place; returns the trainer state."""
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_weights(path, model)
    return torch.load(path / TRAINER_STATE, weights_only=False)


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Model weights only (init_from, generate, eval): the optimizer part is never read."""
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def prune(ckpt_root: Path, keep_last: int, keep_every: int = 0) -> list[Path]:
    """Delete old complete checkpoints beyond the newest `keep_last` (keeping multiples of keep_every)."""
    ckpts = complete_checkpoints(ckpt_root)
    removed = []
    for step, path in ckpts[:-keep_last] if keep_last > 0 else ckpts:
        if keep_every and step % keep_every == 0:
            continue
        (path / COMPLETE).unlink(missing_ok=True)   # incomplete first: never half-deleted but "complete"
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
