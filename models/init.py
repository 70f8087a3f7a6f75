"""Parameter init that depends on nothing but (seed, parameter name).

Every parameter is drawn on the CPU, in fp32, from its own generator seeded by a hash of the
run's seed and the parameter's name, then copied into the parameter. So the numbers do not
depend on the order modules are built or initialised, on the device, or on the world size, and
a rank that holds one shard of a parameter (FSDP2's DTensor) can draw the full tensor and keep
its slice: a sharded init equals a direct one bit for bit. (DTensor random ops on a CPU mesh draw
from each rank's local generator, so shard-local sampling could not reproduce the full draw.)

What is drawn follows each parameter's TagSpec (models/tags.py): `normal` N(0, std) with the
parameterization's std, `zeros`, `ones`, or `module`: the owning module's own
`reset_parameters()`, run on CPU stand-ins of its parameters under a CPU RNG seeded by
(seed, module name), so stock modules (nn.LayerNorm, a depthwise nn.Conv1d) keep their init.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn

from models.tags import TagSpec, param_specs

WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    """A parameter or module name without activation-checkpoint / compile wrapper parts."""
    for part in WRAPPER_PREFIXES:
        name = name.replace(part, "")
    return name.removesuffix("._checkpoint_wrapped_module").removesuffix("._orig_mod")


def name_seed(seed: int, name: str) -> int:
    """A 63-bit generator seed from (seed, name)."""
    digest = hashlib.sha256(f"{seed}/{plain_name(name)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _is_dtensor(t: torch.Tensor) -> bool:
    return hasattr(t, "to_local") and hasattr(t, "device_mesh")


def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full-size CPU tensor into `p`, or into `p`'s local shard when it is a DTensor."""
    if _is_dtensor(p):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
        local = p.to_local()
        local.copy_(full[tuple(slice(o, o + s) for o, s in zip(offset, shape))].to(local.dtype))
    else:
        p.copy_(full.to(p.dtype))


def _draw(spec: TagSpec, shape: torch.Size, std: float, seed: int) -> torch.Tensor:
    if spec.init == "zeros":
        return torch.zeros(shape)
    if spec.init == "ones":
        return torch.ones(shape)
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape).normal_(0.0, std, generator=g)


def _module_init(module: nn.Module, name: str, params: dict[str, nn.Parameter], seed: int) -> dict[str, torch.Tensor]:
    """The values `module.reset_parameters()` gives its own parameters, computed on CPU stand-ins
    under a CPU RNG seeded by (seed, module name); the module's parameters are left untouched."""
    if not hasattr(module, "reset_parameters"):
        names = [f"{name}.{p}" if name else p for p in params]
        raise TypeError(f"{type(module).__name__} ({name}) owns {', '.join(names)} with init: module but has "
                        "no reset_parameters()")
    real = dict(module._parameters)
    try:
        for pname, p in params.items():
            module._parameters[pname] = nn.Parameter(torch.empty(p.shape), requires_grad=p.requires_grad)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(name_seed(seed, name))
            module.reset_parameters()
        return {pname: module._parameters[pname].detach().clone() for pname in params}
    finally:
        module._parameters.clear()
        module._parameters.update(real)


@torch.no_grad()
def init_parameters(model: nn.Module, param: object, seed: int) -> None:
    """Initialise every parameter of `model` (meta parameters are skipped: nothing to write).

    `param` is the model's parameterization (its `init_std(spec, residual_out)`); tied weights
    are initialised once, under their first name."""
    specs = param_specs(model)          # also fails on an untagged parameter or an unknown tag
    for mod_name, module in model.named_modules():
        own = {}
        for pname, p in module.named_parameters(recurse=False):
            full_name = f"{mod_name}.{pname}" if mod_name else pname
            if full_name in specs and not p.is_meta:
                own[pname] = (p, specs[full_name], full_name)
        if not own:
            continue
        module_owned = {pname: p for pname, (p, spec, _) in own.items() if spec.init == "module"}
        values = _module_init(module, mod_name, module_owned, seed) if module_owned else {}
        residual_out = getattr(module, "is_residual_out", False)
        fulls = {pname: values[pname] if pname in values else _draw(
                     spec, p.shape, param.init_std(spec, residual_out) if spec.init == "normal" else 0.0,
                     name_seed(seed, full_name))
                 for pname, (p, spec, full_name) in own.items()}
        if hasattr(module, "derived_init"):     # values that follow from the others' (weight norm's gain)
            fulls.update(module.derived_init(fulls))
        for pname, (p, _, _) in own.items():
            copy_full_into(p, fulls[pname])
