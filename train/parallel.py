"""Process groups and parallel backends (`parallel.backend: none | ddp | fsdp2 | deepspeed`).

The trainer loop is the same for every backend: a `Backend` builds the model and applies
parallelism from the model's own plan (`apply_parallelism`: activation checkpointing ->
torch.compile per block -> FSDP2 units, then DDP around it for ddp). FSDP2 builds on the meta
device and materialises one parameter at a time, each rank keeping its shard; none / ddp build
directly; DeepSpeed builds directly and ZeRO-3 partitions in `deepspeed.initialize` (building
under `deepspeed.zero.Init` is not done: each rank holds the full model once, at start). It tells
the loop how to skip gradient sync on non-final micro-batches, and provides the collectives the loop needs (token counts,
losses, stop agreement). Model code stays single-device. Checkpoints go through DCP's
`get_state_dict` / `set_state_dict`, which see through every wrapper, so the saved keys are the
plain model's and a run can resume under another backend or world size.

The step itself also goes through the backend (`backward`, `clip_grads`, `optimizer_step`,
`discard_grads`, `setup`, `close`): the defaults are exactly the plain torch calls, and
`DeepSpeedBackend` maps them onto a DeepSpeed ZeRO engine (see its docstring).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import logging
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from models.registry import ConfigError
from train.runtime import any_rank, autocast


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
    if dist.get_world_size() > 1:
        preflight(device_type, local)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local)


def preflight(device_type: str, local_rank: int) -> None:
    """An all-reduce across every rank before any work, so a broken node or network fails now,
    naming this host, rather than in the first step after the data and the model are built."""
    import socket
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    world = dist.get_world_size()
    try:
        ones = torch.ones(1, device=device)
        dist.all_reduce(ones)
        ok = int(ones.item()) == world
    except Exception as e:  # noqa: BLE001 - any collective failure: say where
        raise RuntimeError(f"pre-flight all-reduce failed on host {socket.gethostname()} (rank {dist.get_rank()} "
                           f"of {world}): {type(e).__name__}: {e}") from e
    if not ok:
        raise RuntimeError(f"pre-flight all-reduce on host {socket.gethostname()} (rank {dist.get_rank()}) summed "
                           f"to {int(ones.item())}, not the world size {world}")


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
    def build(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """The model the loop trains: built directly on the device (initialised there from its
        seed), then activation checkpointing and compile from its plan, then the wrapper."""
        model = make_model().to(self.device)
        apply_parallelism(model, self.cfg.parallel)
        return self._wrap(model)

    def _wrap(self, model: nn.Module) -> nn.Module:
        return model

    def autocast(self):
        """The forward's precision context: bf16 autocast on CUDA (FSDP2 and DeepSpeed cast
        parameters themselves instead)."""
        return autocast(self.device)

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        """Skip the gradient all-reduce on micro-batches that are not the step's last."""
        yield

    # -- collectives -----------------------------------------------------------------
    @property
    def distributed(self) -> bool:
        """A process group exists (also with one rank): the step's counts go through collectives."""
        return self.info.distributed

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        """The sum of `t` over ranks (a new tensor on the collective device; `t` itself with
        one rank). Stays on the device: nothing is read back to the host."""
        if not self.distributed:
            return t
        t = t.to(self._comm_device(), copy=True)
        dist.all_reduce(t)
        return t

    def any(self, flag: bool) -> bool:
        return any_rank(flag)

    def barrier(self) -> None:
        if self.info.distributed and self.info.world_size > 1:
            dist.barrier()

    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    @property
    def grad_scale(self) -> float:
        """Multiplier on the local loss so that averaged gradients equal the global sum / tokens."""
        return float(self.info.world_size)

    # -- the step (defaults: the plain torch calls) ------------------------------------
    engine = None          # the DeepSpeed engine, when there is one (checkpoints use its format)

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, accum: int) -> nn.Module:
        """Called once the optimizer exists (and init_from weights are loaded); returns the model
        the loop trains (the same module for none/ddp/fsdp2)."""
        return model

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grads(self, model: nn.Module, max_norm: float) -> torch.Tensor | None:
        """Clip and return the global grad norm as a device tensor (not read back), or None when
        the backend clips inside its step."""
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        if hasattr(norm, "full_tensor"):    # FSDP2: a DTensor whose full value is its local one
            norm = norm.full_tensor()
        return norm

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float | None:
        """Apply the update and clear the gradients; returns the grad norm if the step computed it."""
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return None

    def discard_grads(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """A skipped step (non-finite, spike): drop the accumulated gradients without an update."""
        optimizer.zero_grad(set_to_none=True)

    def close(self) -> None:
        """Release backend state before the process group goes down."""


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_activation_checkpointing(model: nn.Module, every: int = 1, names: list[str] | None = None) -> None:
    """Wrap modules 0, every, 2 every, ... of `names` (default: the model plan's checkpointable
    blocks) in torch's checkpoint_wrapper (non-reentrant): their activations are recomputed in
    backward. Parameter names gain a wrapper prefix that DCP checkpoints strip, so checkpoints
    keep the plain model's keys."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    names = model.parallel_plan().checkpointable if names is None else names
    for name in names[::every]:
        _replace(model, name, checkpoint_wrapper(model.get_submodule(name)))


def apply_parallelism(model: nn.Module, pcfg: Any, fsdp: dict[str, Any] | None = None) -> nn.Module:
    """The one place parallelism is applied, in torchtitan's order, from the model's own plan
    (`model.parallel_plan()`, models/parallel_plan.py): activation checkpointing, then torch.compile
    per block, then FSDP2 (`fsdp`: fully_shard's mesh / policies; None: no sharding): each unit,
    then the root, leaving out the parameters that shard themselves."""
    plan = model.parallel_plan()
    if fsdp is not None:            # self-sharding modules first: their new parameters are the ignored ones
        for name in plan.self_sharded:
            model.get_submodule(name).shard(fsdp["mesh"])
    named = dict(model.named_parameters())
    ignored = {named[n] for n in plan.ignored_params}
    if pcfg.activation_checkpointing != "none":
        every = 1 if pcfg.activation_checkpointing == "full" else pcfg.ac_every
        apply_activation_checkpointing(model, every, plan.checkpointable)
    if pcfg.compile:
        for name in plan.compiled:
            model.get_submodule(name).compile()
    if fsdp is not None:
        from torch.distributed.fsdp import fully_shard
        extra = {"ignored_params": ignored} if ignored else {}
        for name in sorted(plan.units, key=lambda n: -n.count(".")):     # nested units before their parents
            fully_shard(model.get_submodule(name), **fsdp, **extra,
                        reshard_after_forward=plan.reshard_after_forward.get(name, pcfg.reshard_after_forward))
        fully_shard(model, reshard_after_forward=pcfg.reshard_after_forward, **fsdp, **extra)
    return model


class DDPBackend(Backend):
    name = "ddp"

    def _wrap(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel
        ids = [self.device.index] if self.device.type == "cuda" else None
        # broadcast_buffers off: buffers follow from the config (RoPE tables) or are set alike on
        # every rank (a removable norm's switch state); its step statistics must stay per rank
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)

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

    def build(self, make_model: Callable[[], nn.Module]) -> nn.Module:
        """Built on the meta device, sharded from the plan, then materialised one parameter at a
        time: each rank draws a parameter's full init on the CPU from (seed, name) and keeps only
        its shard (models/init.py), so no rank ever holds the full model."""
        with torch.device("meta"):
            model = make_model()
        apply_parallelism(model, self.cfg.parallel, self._fsdp_kwargs())
        # CPU offload keeps the sharded parameters on the CPU; buffers live on the compute device
        model.to_empty(device="cpu" if self.cfg.parallel.cpu_offload else self.device)
        model.init_weights(device=self.device)
        if self.cfg.parallel.cpu_offload:      # offload moves parameters only: buffers go to the device
            for module in model.modules():
                for name, buf in module.named_buffers(recurse=False):
                    if buf is not None and buf.device != self.device:
                        module._buffers[name] = buf.to(self.device)
        return model

    def _fsdp_kwargs(self) -> dict[str, Any]:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

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
            if self.device.type != "cuda":
                raise ConfigError("parallel.cpu_offload", "offloads GPU parameters to the CPU: it needs "
                                                          "device=cuda (training on the CPU already keeps them there)")
            kwargs["offload_policy"] = CPUOffloadPolicy()
        return kwargs

    def autocast(self):
        return contextlib.nullcontext()       # FSDP2's MixedPrecisionPolicy casts parameters itself

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        model.set_requires_gradient_sync(sync)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)


class DeepSpeedBackend(Backend):
    """DeepSpeed ZeRO stage 1/2/3 (`parallel.zero_stage`), launched with torchrun like the others.

    - Our torch optimizer (all its tagged groups: weight decay, CompleteP lr/eps, base_lr) is the
      client optimizer of `deepspeed.initialize`; ZeRO wraps it and keeps its param_groups, so
      the loop's `set_lr(optimizer, factor)` keeps setting every group's lr from `base_lr` each
      step. No client lr scheduler: the schedule is a pure function of our step, which our
      trainer_state restores, so there is no scheduler state to checkpoint or to get out of sync.
    - The generated config: micro-batch, accumulation steps, `gradient_clipping`
      (= optim.grad_clip), bf16 (param_dtype: auto -> bf16 on CUDA, fp32 on CPU), ZeRO stage.
    - Accumulation: the loop's `grad_sync(sync)` sets the engine's accumulation boundary, each
      micro-batch calls `engine.backward(loss, scale_wrt_gas=False)` (our loss is already
      normalised by the step's target tokens, so DeepSpeed's division by the accumulation steps
      is turned off) and `engine.step()` runs once, at the boundary.
    - Finite guard: the loop checks the all-reduced loss before the step; a non-finite loss (or
      a skipped spike) never reaches `engine.step()`, and the accumulated gradients are dropped
      the way DeepSpeed's own overflow path drops them. A non-finite grad norm at the step is
      DeepSpeed's overflow: it skips the update itself, and the loop reports the step skipped.
    - Teardown: `engine.destroy()` then `gc.collect()` before the process group is destroyed
      (without it a rank sometimes aborts at exit with SIGABRT).
    """

    name = "deepspeed"

    def __init__(self, cfg, info: DistInfo, device: torch.device):
        super().__init__(cfg, info, device)
        if cfg.optim.name == "muon":
            raise ConfigError("parallel.backend", "deepspeed does not support optim.name=muon (ZeRO flattens the "
                                                  "parameters Muon orthogonalises as matrices); use adamw or fsdp2")
        self.engine = None

    def _bf16(self) -> bool:
        choice = self.cfg.parallel.param_dtype
        return choice == "bf16" or (choice == "auto" and self.device.type == "cuda")

    def ds_config(self, accum: int) -> dict[str, Any]:
        t = self.cfg.train
        return {
            "train_micro_batch_size_per_gpu": t.micro_batch,
            "gradient_accumulation_steps": accum,
            "train_batch_size": t.global_batch,
            "gradient_clipping": float(self.cfg.optim.grad_clip),
            "zero_optimization": {"stage": self.cfg.parallel.zero_stage},
            "bf16": {"enabled": self._bf16()},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, accum: int) -> nn.Module:
        import deepspeed
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        # DeepSpeed calls these torch collectives by their deprecated names on every step
        warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated",
                                category=FutureWarning)
        # no JIT build of the shared-memory comm op on CPU (gloo does the collectives)
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        os.environ.setdefault("LOCAL_RANK", str(self.info.local_rank))    # a run started without torchrun
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo")
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config(accum))
        self.engine = engine
        return engine

    def autocast(self):
        return contextlib.nullcontext()       # bf16 is DeepSpeed's (module in bf16), fp32 otherwise

    @contextlib.contextmanager
    def grad_sync(self, model: nn.Module, sync: bool) -> Iterator[None]:
        model.set_gradient_accumulation_boundary(sync)
        yield

    def backward(self, model: nn.Module, loss: torch.Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)

    def clip_grads(self, model: nn.Module, max_norm: float) -> torch.Tensor | None:
        return None                           # gradient_clipping in the DeepSpeed config

    def optimizer_step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float | None:
        model.step()
        norm = model.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        return norm

    def discard_grads(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """What DeepSpeed's own overflow branch does at a step, without the step."""
        opt = model.optimizer
        opt.zero_grad(set_to_none=True)
        if self.cfg.parallel.zero_stage == 3:
            opt.averaged_gradients = {}
        else:
            if hasattr(opt, "_release_preflattened_grad_buffers"):
                opt._release_preflattened_grad_buffers()
            for k in list(getattr(opt, "averaged_gradients", {}).keys()):
                opt.averaged_gradients[k] = None
            for k in list(getattr(opt, "all_grad_tensors", {}).keys()):
                opt.all_grad_tensors[k] = None
            if hasattr(opt, "micro_step_id"):
                from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID
                opt.micro_step_id = INITIAL_MICRO_STEP_ID
        model.zero_grad()

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
            # forget DeepSpeed's wrapper of this process group: the caller destroys the group, and
            # a later run in the same process wraps its new one
            importlib.import_module("deepspeed.comm.comm").cdb = None
            groups = importlib.import_module("deepspeed.utils.groups")
            for name in ("_WORLD_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP", "_TENSOR_MODEL_PARALLEL_GROUP",
                         "_MODEL_PARALLEL_GROUP", "_DATA_PARALLEL_GROUP"):
                if hasattr(groups, name):
                    setattr(groups, name, None)
            for name in ("_EXPERT_PARALLEL_GROUP", "_EXPERT_PARALLEL_GROUP_RANKS", "_EXPERT_DATA_PARALLEL_GROUP",
                         "_EXPERT_DATA_PARALLEL_GROUP_RANKS", "_ALL_TO_ALL_GROUP"):
                if isinstance(getattr(groups, name, None), dict):
                    getattr(groups, name).clear()
        gc.collect()


BACKENDS = {"none": Backend, "ddp": DDPBackend, "fsdp2": FSDP2Backend, "deepspeed": DeepSpeedBackend}


def make_backend(cfg, info: DistInfo, device: torch.device) -> Backend:
    return BACKENDS[cfg.parallel.backend](cfg, info, device)


