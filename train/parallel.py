"""Process groups and parallel backends (`parallel.backend: none | ddp | fsdp2`).

The trainer loop is the same for every backend: a `Backend` wraps the model (activation
checkpointing -> torch.compile per block -> DDP or FSDP2), tells the loop how to skip gradient
sync on non-final micro-batches, and provides the collectives the loop needs (token counts,
losses, stop agreement). Model code stays single-device. Checkpoints go through DCP's
`get_state_dict` / `set_state_dict`, which see through every wrapper, so the saved keys are the
plain model's and a run can resume under another backend or world size.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from models.registry import ConfigError


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def launched_world_size() -> int:
    """World size set by torchrun (or a Slurm-aware launcher), 1 when run directly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend_name: str, device_type: str, timeout_s: float,
                     cpu_collectives: bool = False) -> DistInfo:
    """Join the process group torchrun describes (env://), or make a 1-process group for
    ddp/fsdp2 runs started without torchrun. `parallel.backend: none` never makes one."""
    world = launched_world_size()
    if backend_name == "none":
        if world > 1:
            raise ConfigError("parallel.backend", f"launched with {world} processes but parallel.backend=none; "
                                                  "use ddp or fsdp2")
        return DistInfo()
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    pg_backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda" and cpu_collectives:
        pg_backend = "cuda:nccl,cpu:gloo"     # FSDP2 CPU offload reduces grad norms on CPU tensors
    timeout = datetime.timedelta(seconds=timeout_s)
    if world > 1 or "RANK" in os.environ:
        dist.init_process_group(pg_backend, timeout=timeout)
    else:
        dist.init_process_group(pg_backend, rank=0, world_size=1, store=dist.HashStore(), timeout=timeout)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def config_hash(cfg_dict: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(cfg_dict, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_same_config(info: DistInfo, cfg_dict: dict[str, Any]) -> None:
    """Every rank must train the same resolved config; a mismatch is a launch error."""
    if not info.distributed or info.world_size == 1:
        return
    mine = config_hash(cfg_dict)
    hashes: list[Any] = [None] * info.world_size
    dist.all_gather_object(hashes, mine)
    if len(set(hashes)) > 1:
        detail = ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
        raise ConfigError("", f"ranks resolved different configs ({detail}); launch every rank with the same "
                              "config file and overrides")


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class Backend:
    """The loop's view of parallelism. `none` is the plain single-process case."""

    name = "none"

    def __init__(self, cfg, info: DistInfo, device: torch.device):
        self.cfg, self.info, self.device = cfg, info, device

    # -- model wrapping ------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        pcfg = self.cfg.parallel
        if pcfg.activation_checkpointing != "none":
            every = 1 if pcfg.activation_checkpointing == "full" else pcfg.ac_every
            model.checkpoint_blocks = {i for i in range(len(model.blocks)) if i % every == 0}
        if pcfg.compile:
            for block in model.blocks:
                block.compile()
        return self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches that are not the step's last."""
        yield

    # -- collectives -----------------------------------------------------------------
    def sum(self, value: float) -> float:
        if not self.info.distributed or self.info.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._comm_device())
        dist.all_reduce(t)
        return float(t.item())

    def any(self, flag: bool) -> bool:
        return self.sum(1.0 if flag else 0.0) > 0

    def barrier(self) -> None:
        if self.info.distributed and self.info.world_size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @property
    def grad_scale(self) -> float:
        """Multiplier on the local loss so that averaged gradients equal the global sum / tokens."""
        return float(self.info.world_size)


class DDPBackend(Backend):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        if sync:
            yield
        else:
            with model.no_sync():
                yield


class FSDP2Backend(Backend):
    name = "fsdp2"

    def _param_dtype(self) -> torch.dtype:
        choice = self.cfg.parallel.param_dtype
        if choice == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return _DTYPES[choice]

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        pcfg = self.cfg.parallel
        world = self.info.world_size
        if pcfg.replicate > 1:
            if world % pcfg.replicate:
                raise ConfigError("parallel.replicate", f"{pcfg.replicate} does not divide the world size {world}")
            mesh = init_device_mesh(self.device.type, (pcfg.replicate, world // pcfg.replicate),
                                    mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh(self.device.type, (world,), mesh_dim_names=("shard",))
        kwargs: dict[str, Any] = {
            "mesh": mesh,
            "mp_policy": MixedPrecisionPolicy(param_dtype=self._param_dtype(),
                                              reduce_dtype=_DTYPES[pcfg.reduce_dtype]),
        }
        if pcfg.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for i, block in enumerate(model.blocks):
            # the last block is resharded by the root's own all-gather: keep it unsharded
            last = i == len(model.blocks) - 1
            fully_shard(block, reshard_after_forward=pcfg.reshard_after_forward and not last, **kwargs)
        fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **kwargs)
        return model

    def autocast(self):
        return contextlib.nullcontext()       # FSDP2's MixedPrecisionPolicy casts parameters itself

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


BACKENDS = {"none": Backend, "ddp": DDPBackend, "fsdp2": FSDP2Backend}


def make_backend(cfg, info: DistInfo, device: torch.device) -> Backend:
    return BACKENDS[cfg.parallel.backend](cfg, info, device)


def unwrap(model: nn.Module) -> nn.Module:
    """The Decoder inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
