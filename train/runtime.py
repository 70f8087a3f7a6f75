"""Helpers every entry point shares (training, bench, evaluation, probes, generation), each
written once: device resolution, precision, unwrapping a model from its wrappers, cross-rank
agreement, RNG state, and loading a run's model from its run directory."""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, ContextManager

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from models.registry import ConfigError

if TYPE_CHECKING:
    import models
    from train.config import Config


def resolve_device(name: str) -> torch.device:
    """`device: auto | cpu | cuda` -> a torch.device (auto: CUDA when there is one)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device | str, enabled: bool = True) -> ContextManager:
    """bf16 autocast on CUDA, nothing on CPU (fp32 keeps CPU runs exactly reproducible)."""
    if enabled and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP, a DeepSpeed engine or torch.compile (FSDP2 and activation
    checkpointing wrap in place or per block, so the root is already the model)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        if inner is None:
            return model
        model = inner


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _flag_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any rank (so all ranks take the same branch)."""
    if not distributed():
        return flag
    t = torch.tensor([1 if flag else 0], device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank0_decides(flag: bool) -> bool:
    """Rank 0's `flag` on every rank."""
    if not distributed():
        return flag
    t = torch.tensor([int(flag) if dist.get_rank() == 0 else 0], device=_flag_device())
    dist.all_reduce(t)
    return bool(t.item())


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()       # the current device only: world sizes may change
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_run_config(run_dir: str | Path) -> Config:
    """A run's saved config.yaml as a Config (its records, code_version and derived, dropped)."""
    from train.config import RECORD_KEYS, config_from_dict
    from train.rundir import RunDir
    run = RunDir(run_dir)
    if not run.exists():
        raise ConfigError("RUN_DIR", f"{run_dir} is not a run directory (no config.yaml)")
    data = run.read_config()
    for key in RECORD_KEYS:
        data.pop(key, None)
    return config_from_dict(data)


def load_model(run_dir: str | Path, step: int | str | None = "latest",
               device: str | torch.device = "cpu") -> tuple[models.Decoder, Config, int]:
    """The run's model with the weights of a complete checkpoint (newest by default), in eval
    mode, with the FFN activation its last update trained with (a ReLU fine-tune switch)."""
    import models
    from train import checkpoint as ckpt
    from train.callbacks.activation_schedule import apply_checkpoint_activation
    from train.rundir import RunDir
    cfg = load_run_config(run_dir)
    try:
        found_step, path = ckpt.find_checkpoint(RunDir(run_dir).checkpoints, step)
    except FileNotFoundError as e:
        raise ConfigError("--step", str(e)) from None
    model = models.Decoder(cfg.model).to(device)
    ckpt.load_model_weights(path, model)
    apply_checkpoint_activation(model, found_step, cfg)
    model.eval()
    return model, cfg, found_step
