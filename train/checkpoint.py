"""Atomic checkpoints in the torch.distributed.checkpoint (DCP) format.

A checkpoint is `checkpoints/step-XXXXXXXX/`: the DCP files of {"model", "optim"} plus
`trainer_state.pt` (step, data position, RNG states, ...). It is written under a temporary name,
renamed, and only then given its COMPLETE marker; resume considers complete ones only, so a
crash or a second signal at any point leaves the previous checkpoint as the newest complete one.
DCP needs no process group, so the distributed backends reuse this format unchanged.

Under `parallel.backend: deepspeed` the model and optimizer part is DeepSpeed's own format instead
(`engine.save_checkpoint` into `deepspeed/` inside the same temporary dir, plus `deepspeed.json`
naming the ZeRO stage and world size); trainer_state.pt, the RNG files, the rename and COMPLETE
are the same. Such a checkpoint resumes on the same world size only; `consolidate` and
`load_model_weights` read it without a process group through DeepSpeed's zero_to_fp32.
"""
from __future__ import annotations

import json
import os
import shutil
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from models.registry import ConfigError
from train.rundir import step_name

COMPLETE = "COMPLETE"
# Without a process group DCP warns that it assumes a single process: that is the intent here.
warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
TRAINER_STATE = "trainer_state.pt"
DS_META = "deepspeed.json"        # marks a DeepSpeed-format checkpoint
DS_DIR = "deepspeed"              # engine.save_checkpoint's save_dir inside the step dir
DS_TAG = "zero"                   # its tag (a subdirectory of DS_DIR)


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed (full disk, lost mount): the message names the directory."""


class UnusableCheckpoint(RuntimeError):
    """No checkpoint of a run could be loaded (the CLI prints its one line and exits 1)."""


class CheckpointDamaged(Exception):
    """A complete checkpoint whose files do not match their recorded checksums (or are missing)."""

    def __init__(self, path: Path, file: str, why: str):
        self.path, self.file = path, file
        super().__init__(f"{path / file}: {why}")


def _crc32(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def checksum_files(path: Path) -> dict[str, str]:
    """CRC32 of every file under a checkpoint dir (relative path -> hex), COMPLETE excluded."""
    return {str(f.relative_to(path)): _crc32(f) for f in sorted(path.rglob("*"))
            if f.is_file() and f.name != COMPLETE}


def verify_checkpoint(path: Path) -> float:
    """Check every file against the checksums in COMPLETE; returns the seconds it took. Raises
    CheckpointDamaged naming the first file that is missing or differs. Checkpoints written
    before checksums were recorded (COMPLETE holds only the step) pass unchecked."""
    t0 = time.perf_counter()
    try:
        record = json.loads((path / COMPLETE).read_text())
    except ValueError:
        return 0.0
    if not isinstance(record, dict):
        return 0.0
    for name, crc in record.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise CheckpointDamaged(path, name, "missing")
        if _crc32(f) != crc:
            raise CheckpointDamaged(path, name, "checksum mismatch (the file changed after it was written)")
    return time.perf_counter() - t0


def is_deepspeed(path: Path) -> bool:
    return (Path(path) / DS_META).exists()


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
    try:
        wanted = int(step)
    except (TypeError, ValueError):
        raise FileNotFoundError(f"expected 'latest' or a step number, got {step!r}") from None
    for s, p in ckpts:
        if s == wanted:
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


def rng_file(rank: int) -> str:
    """A rank's RNG state file inside a checkpoint."""
    return f"rng-rank{rank:05d}.pt"


@dataclass
class PendingSave:
    """A checkpoint whose shards are still being written in the background (async save)."""

    step: int
    tmp: Path
    final: Path
    future: Any          # DCP's Future; done when this rank's shards are on disk
    t0: float
    blocking_seconds: float


def save_checkpoint(ckpt_root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainer_state: dict[str, Any], rng: dict[str, Any] | None = None,
                    rank: int = 0, barrier: Callable[[], None] = lambda: None,
                    agree: Callable[[bool], bool] = lambda flag: flag, engine: Any = None,
                    async_group: Any = False) -> dict[str, Any] | PendingSave:
    """Write checkpoint `step` atomically; returns {"seconds", "bytes", "path"} for the event row.

    Under a process group every rank calls this: each writes its DCP shards and its RNG state
    into the shared temporary directory; rank 0 renames it and writes COMPLETE only after all
    ranks have finished (barriers), so a checkpoint is never complete with a missing shard.
    With a DeepSpeed `engine` the model/optimizer part is the engine's own checkpoint.

    async_group (not False): DCP's async save (the state is copied to CPU memory, then written
    by a background thread; the process group for its collectives, None without one); returns
    a PendingSave at once, and `finish_save` later makes it complete.
    """
    t0 = time.perf_counter()
    final = ckpt_root / step_name(step)
    if agree((final / COMPLETE).exists()):       # one decision for all ranks (caching file systems)
        return {"seconds": 0.0, "bytes": _size(final), "path": str(final), "existed": True}
    tmp = ckpt_root / f".tmp-{step_name(step)}"
    if rank == 0:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()                    # before any rank writes into it (an async writer makes it late)
    barrier()
    optim_empty = optimizer is not None and not optimizer.state
    future = None
    if engine is not None:
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        engine.save_checkpoint(str(tmp / DS_DIR), tag=DS_TAG, save_latest=False)
        if rank == 0:
            (tmp / DS_META).write_text(json.dumps({"tag": DS_TAG, "world_size": world,
                                                   "zero_stage": engine.zero_optimization_stage()}) + "\n")
        if (tmp / DS_DIR / DS_TAG).is_dir():
            _fsync_files(tmp / DS_DIR / DS_TAG)
        optim_empty = False
    else:
        if optimizer is not None:
            # get_state_dict fills an empty optimizer's state with a zero-lr step (AdamW's counter
            # becomes 1); undo that below so a checkpoint before the first step changes nothing
            msd, osd = get_state_dict(model, optimizer)
            state = {"model": msd, "optim": osd}
        else:
            state = {"model": get_model_state_dict(model)}
        try:
            if async_group is not False:
                future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=async_group)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as e:     # e.g. a full disk: say where it was writing
            raise CheckpointWriteError(f"could not write checkpoint {tmp}: {type(e).__name__}: {e}") from e
    if optim_empty:
        optimizer.state.clear()
    trainer_state = {**trainer_state, "optim_empty": optim_empty}
    if rng is not None:
        torch.save(rng, tmp / rng_file(rank))
    if rank == 0:
        torch.save(trainer_state, tmp / TRAINER_STATE)
    pending = PendingSave(step, tmp, final, future, t0, time.perf_counter() - t0)
    if future is not None:
        return pending
    return finish_save(pending, rank, barrier)


def finish_save(pending: PendingSave, rank: int = 0, barrier: Callable[[], None] = lambda: None) -> dict[str, Any]:
    """Wait for this rank's shards, then (every rank, in lockstep) make the checkpoint complete:
    fsync, barrier, rank 0 checksums every file, renames and writes COMPLETE last."""
    if pending.future is not None:
        try:
            pending.future.result()
        except (Exception, CheckpointException) as e:
            raise CheckpointWriteError(f"could not write checkpoint {pending.tmp}: {type(e).__name__}: {e}") from e
    tmp, final = pending.tmp, pending.final
    _fsync_files(tmp)
    barrier()
    checksum_seconds = 0.0
    if rank == 0:
        if final.exists():                      # renamed earlier but never marked complete
            shutil.rmtree(final)
        t_sum = time.perf_counter()
        files = checksum_files(tmp)             # every rank's files are written (barrier above)
        checksum_seconds = time.perf_counter() - t_sum
        os.rename(tmp, final)
        (final / COMPLETE).write_text(json.dumps({"step": pending.step, "files": files}) + "\n")
        _fsync_dir(final.parent)
    barrier()
    return {"seconds": time.perf_counter() - pending.t0, "bytes": _size(final), "path": str(final),
            "checksum_seconds": checksum_seconds, "blocking_seconds": pending.blocking_seconds}


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    rank: int = 0, engine: Any = None, world_size: int | None = None) -> dict[str, Any]:
    """Load model (and optimizer) state in place, resharding to the current world size.

    Returns the trainer state with this rank's RNG state under "rng" (rank 0's when the
    checkpoint was written by fewer ranks). With a DeepSpeed `engine` the checkpoint must be a
    DeepSpeed one written by `world_size` ranks.
    """
    ds_ckpt = is_deepspeed(path)
    if engine is not None or ds_ckpt:
        _check_deepspeed_resume(path, engine, ds_ckpt, world_size)
        engine.load_checkpoint(str(path / DS_DIR), tag=DS_TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
    elif optimizer is not None:
        msd, osd = get_state_dict(model, optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        load_model_weights(path, model)
    trainer_state = torch.load(path / TRAINER_STATE, weights_only=False)
    if optimizer is not None and trainer_state.get("optim_empty"):
        optimizer.state.clear()          # saved before the first optimizer step
    rng_path = path / rng_file(rank)
    if not rng_path.exists():
        rng_path = path / rng_file(0)
    if rng_path.exists():
        trainer_state["rng"] = torch.load(rng_path, weights_only=False)
    return trainer_state


def _check_deepspeed_resume(path: Path, engine: Any, ds_ckpt: bool, world_size: int | None) -> None:
    if engine is None:
        raise ConfigError("parallel.backend", f"{path} is a DeepSpeed checkpoint: resume it with "
                                              "parallel.backend=deepspeed (or take its weights with init_from)")
    if not ds_ckpt:
        raise ConfigError("parallel.backend", f"{path} is not a DeepSpeed checkpoint: parallel.backend=deepspeed "
                                              "resumes DeepSpeed checkpoints only (take its weights with init_from)")
    meta = json.loads((path / DS_META).read_text())
    stage = engine.zero_optimization_stage()
    if world_size is not None and meta["world_size"] != world_size:
        raise ConfigError("parallel.backend", f"the DeepSpeed checkpoint {path} was written by {meta['world_size']} "
                                              f"ranks, this run has {world_size}: parallel.backend=deepspeed resumes "
                                              "on the same world size only (start a new run with init_from to keep "
                                              "the weights)")
    if meta["zero_stage"] != stage:
        raise ConfigError("parallel.zero_stage", f"the DeepSpeed checkpoint {path} is ZeRO stage {meta['zero_stage']}, "
                                                 f"this run uses stage {stage}")


def _deepspeed_model_state(path: Path) -> dict[str, torch.Tensor]:
    """The full fp32 model state of a DeepSpeed checkpoint (zero_to_fp32; no process group)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    meta = json.loads((path / DS_META).read_text())
    state = get_fp32_state_dict_from_zero_checkpoint(str(path / DS_DIR), tag=meta["tag"])
    return {k: v.detach().clone() for k, v in state.items()}


def consolidate(path: Path, out: Path) -> dict[str, Any]:
    """One full-precision model state dict from a (possibly sharded) checkpoint, no process group."""
    if is_deepspeed(path):
        state = _deepspeed_model_state(path)
    else:
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        state = _load_state_dict_from_keys({"model"}, checkpoint_id=str(path))["model"]
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in state.items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, out)
    return state


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Model weights only (init_from, generate, eval): the optimizer part is never read."""
    if is_deepspeed(path):
        set_model_state_dict(model, _deepspeed_model_state(path), options=StateDictOptions(full_state_dict=True))
        return
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=str(path))
    set_model_state_dict(model, state["model"])


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The model keys of a checkpoint and their shapes (DCP: from its metadata, no tensor read)."""
    if is_deepspeed(path):
        return {k: tuple(v.shape) for k, v in _deepspeed_model_state(path).items()}
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    return {k[len("model."):]: tuple(md.size) for k, md in meta.state_dict_metadata.items()
            if k.startswith("model.") and hasattr(md, "size")}


def init_from_checkpoint(path: Path, model: nn.Module, allow_new: list[str] | tuple[str, ...] = (),
                         allow_unused: list[str] | tuple[str, ...] = (),
                         aliases: dict[str, str] | None = None) -> dict[str, list[str]]:
    """`init_from`: load a checkpoint's weights into `model` (plain or FSDP2-sharded: a DCP load
    of each rank's shards), across architecture changes.

    Every model key takes the checkpoint entry of the same name, or, when the checkpoint has none,
    of its alias (`aliases`: model key -> checkpoint key, e.g. a duplicated norm copying the gain
    it was split from).
    Model keys matching an `allow_new` glob may be absent (they keep their fresh init);
    checkpoint keys matching an `allow_unused` glob may go unused (a removed module). Anything
    else missing or unused, and any shape mismatch, is a ConfigError listing every culprit,
    raised before anything is loaded. Returns {"new": [...], "unused": [...]} for the event row.
    """
    from fnmatch import fnmatchcase

    aliases = aliases or {}
    mine = get_model_state_dict(model)
    theirs = checkpoint_shapes(path)
    sources: dict[str, str] = {}
    new, missing, mismatched = [], [], []
    for key, t in mine.items():
        src = key if key in theirs else aliases.get(key, key)
        if src in theirs:
            if tuple(t.shape) != theirs[src]:
                mismatched.append(f"{key}: {tuple(t.shape)} in the model, {theirs[src]} in the checkpoint"
                                  + (f" (as {src})" if src != key else ""))
            else:
                sources[key] = src
        elif any(fnmatchcase(key, g) for g in allow_new):
            new.append(key)
        else:
            missing.append(key)
    unused = sorted(set(theirs) - set(sources.values()))
    unexpected = [k for k in unused if not any(fnmatchcase(k, g) for g in allow_unused)]
    if mismatched or missing or unexpected:
        parts = []
        if mismatched:
            parts.append("shape mismatches (never allowed):\n    " + "\n    ".join(mismatched))
        if missing:
            parts.append("model parameters missing from the checkpoint (allow fresh init with "
                         "init_from_allow_new: [glob, ...]):\n    " + "\n    ".join(missing))
        if unexpected:
            parts.append("checkpoint entries the model does not use (allow with init_from_allow_unused: "
                         "[glob, ...]):\n    " + "\n    ".join(unexpected))
        raise ConfigError("init_from", f"cannot initialise from {path}:\n  " + "\n  ".join(parts))

    if is_deepspeed(path):
        full = _deepspeed_model_state(path)
        set_model_state_dict(model, {k: full[src] for k, src in sources.items()},
                             options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        by_src: dict[str, list[str]] = {}
        for key, src in sources.items():
            by_src.setdefault(src, []).append(key)
        dcp.load({"model": {src: mine[keys[0]] for src, keys in by_src.items()}}, checkpoint_id=str(path))
        for keys in by_src.values():          # one checkpoint entry feeding several parameters
            for key in keys[1:]:
                mine[key].copy_(mine[keys[0]])
        set_model_state_dict(model, mine, options=StateDictOptions(strict=False))
    return {"new": new, "unused": unused}


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


def _fsync_files(path: Path) -> None:
    """Flush this process's new files, so a node crash cannot leave a COMPLETE over torn files."""
    for f in path.iterdir():
        if f.is_file():
            try:
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
