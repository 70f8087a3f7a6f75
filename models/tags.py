"""Parameter tags: what kind of parameter each one is, declared once as a `TagSpec`.

Every module that owns parameters declares `param_tags = {local_name: tag}` (a class or
instance attribute). Each tag is registered once, by the technique that introduces it, with
what it is: a matrix or not, inside a residual block or not, counted as a matmul in the FLOP
count, eligible for Muon, and who initialises it. Init, optimizer groups, Muon eligibility,
FLOP counting and the parameterization rules read the spec, never the tag's name, so a new
technique lands in the right place by registering its tags and tagging its parameters.

`param_tags(model)` fails loudly on an untagged parameter or an unregistered tag, naming the
module and the parameter.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

Init = Literal["normal", "zeros", "ones", "module"]
# The parameter's row in the muP / CompleteP tables (models/mup.py): every parameterization has a
# rule for every role, so a tag with a role is covered by all of them.
Role = Literal["embedding", "hidden_weight", "fixed_weight", "hidden_bias", "hidden_norm", "final_norm", "readout",
               "table"]
ROLES: tuple[str, ...] = ("embedding", "hidden_weight", "fixed_weight", "hidden_bias", "hidden_norm", "final_norm",
                          "readout", "table")


@dataclass(frozen=True)
class TagSpec:
    """What a parameter kind is.

    init: `normal` draws N(0, std) with the parameterization's std for this spec; `zeros` /
    `ones` fill; `module` leaves it to the owning module's `reset_parameters()` (a stock
    nn.LayerNorm, a depthwise conv, a gain with its own rule). width_scaled: the
    parameterization's width rules (muP / CompleteP init and LR scaling) apply to it. role: its
    row in the parameterization tables (ROLES): embedding, hidden_weight (block matrices),
    fixed_weight (block matrices whose fan-in does not grow with width, e.g. memory sub-keys),
    hidden_bias (block biases and learnable scalars), hidden_norm (block norm gains / biases),
    final_norm, readout (an untied LM head), table (a lookup table inside a block, e.g. memory
    values). None: no rule yet, which the parameterization coverage test reports.
    """

    name: str
    matrix: bool          # a weight matrix (what Muon orthogonalises and muP width-scales)
    in_block: bool        # lives inside a residual block (depth rules apply)
    matmul: bool          # counted in the 6N FLOPs per token
    muon_ok: bool         # Muon may update it (2-D hidden matrices)
    init: Init = "module"
    width_scaled: bool = False
    role: Role | None = None


_TAGS: dict[str, TagSpec] = {}


def register_tag(spec: TagSpec) -> TagSpec:
    """Register a tag (in the technique's own module). Registering the same spec twice is fine
    (a re-imported module); a different spec under a taken name is an error."""
    old = _TAGS.get(spec.name)
    if old is not None and old != spec:
        raise ValueError(f"tag '{spec.name}' is already registered as {old}; not re-registering as {spec}")
    _TAGS[spec.name] = spec
    return spec


def tag_spec(name: str) -> TagSpec:
    try:
        return _TAGS[name]
    except KeyError:
        raise KeyError(f"tag '{name}' is not registered (known: {', '.join(sorted(_TAGS))}); "
                       "register it with models.tags.register_tag(TagSpec(...)) in the module that "
                       "introduces it") from None


def registered_tags() -> list[str]:
    return sorted(_TAGS)


# The core kinds. Techniques register their own beside their code (e.g. memory layers' values).
EMBEDDING = register_tag(TagSpec("embedding", matrix=True, in_block=False, matmul=False, muon_ok=False,
                                 init="normal", role="embedding"))
HIDDEN_MATRIX = register_tag(TagSpec("hidden_matrix", matrix=True, in_block=True, matmul=True, muon_ok=True,
                                     init="normal", width_scaled=True, role="hidden_weight"))
HIDDEN_BIAS = register_tag(TagSpec("hidden_bias", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                   init="zeros", role="hidden_bias"))
NORM_GAIN = register_tag(TagSpec("norm_gain", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                 init="ones", role="hidden_norm"))
NORM_BIAS = register_tag(TagSpec("norm_bias", matrix=False, in_block=True, matmul=False, muon_ok=False,
                                 init="zeros", role="hidden_norm"))
FINAL_NORM_GAIN = register_tag(TagSpec("final_norm_gain", matrix=False, in_block=False, matmul=False,
                                       muon_ok=False, init="ones", role="final_norm"))
FINAL_NORM_BIAS = register_tag(TagSpec("final_norm_bias", matrix=False, in_block=False, matmul=False,
                                       muon_ok=False, init="zeros", role="final_norm"))
OUTPUT_HEAD = register_tag(TagSpec("output_head", matrix=True, in_block=False, matmul=True, muon_ok=False,
                                   init="normal", role="readout"))   # its width rule: the output multiplier
# the untied head's bias (`model.head_bias`): what a LayerNorm's final bias folds into, so it is
# treated as the final norm's parameters are
OUTPUT_BIAS = register_tag(TagSpec("output_bias", matrix=False, in_block=False, matmul=False, muon_ok=False,
                                   init="zeros", role="final_norm"))
SCALAR = register_tag(TagSpec("scalar", matrix=False, in_block=True, matmul=False, muon_ok=False,
                              init="module", role="hidden_bias"))   # learnable scalars / coefficients with their module's init
# Memory layers' value table (Memory Layers at Scale, arXiv 2412.09764): an embedding-bag lookup,
# so not a matmul in the FLOP count; its own optimizer group (fixed base LR) by this spec.
MEMORY_VALUE = register_tag(TagSpec("memory_value", matrix=True, in_block=True, matmul=False, muon_ok=False,
                                    init="module", role="table"))


def tag_linear(linear: nn.Linear, weight: TagSpec | str = HIDDEN_MATRIX,
               bias: TagSpec | str = HIDDEN_BIAS) -> nn.Linear:
    """Attach tags to a stock nn.Linear (an instance attribute, so it survives FSDP wrapping)."""
    linear.param_tags = {"weight": _name(weight), "bias": _name(bias)}
    return linear


def retag(module: nn.Module, mapping: dict[str, TagSpec | str]) -> nn.Module:
    """Give `module` an instance-level copy of its tags with some tags replaced (tag -> tag),
    e.g. the final norm's gain becomes `final_norm_gain`."""
    old = dict(getattr(module, "param_tags", {}))
    module.param_tags = {k: _name(mapping.get(v, v)) for k, v in old.items()}
    return module


def _name(tag: TagSpec | str) -> str:
    return tag.name if isinstance(tag, TagSpec) else tag


def param_tags(model: nn.Module) -> dict[str, str]:
    """Tag of every parameter, by its name in `model.named_parameters()`; raises if one is missing
    or its tag is not registered."""
    return {name: spec.name for name, spec in param_specs(model).items()}


def param_specs(model: nn.Module) -> dict[str, TagSpec]:
    """The TagSpec of every parameter (tied weights: the first owner's tag wins)."""
    specs: dict[str, TagSpec] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        local = getattr(module, "param_tags", None)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if id(p) in seen:
                continue
            if local is None or pname not in local:
                raise KeyError(f"parameter '{full}' of {type(module).__name__} has no tag: "
                               f"add it to {type(module).__name__}.param_tags")
            tag = _name(local[pname])
            if tag not in _TAGS:
                raise KeyError(f"parameter '{full}' of {type(module).__name__} has tag '{tag}', which is not "
                               f"registered (known: {', '.join(sorted(_TAGS))}); register it with "
                               "models.tags.register_tag(TagSpec(...))")
            seen.add(id(p))
            specs[full] = _TAGS[tag]
    return specs
