"""Parameter tags: what kind of parameter each one is.

Optimizer groups (weight decay, per-group LR under muP/CompleteP, Muon vs AdamW) are built
from these tags, never from parameter names. Every module that owns parameters declares
`param_tags = {local_name: tag}` (a class or instance attribute); `param_tags(model)` fails
loudly if any parameter is untagged, so a new technique cannot silently land in the wrong group.
"""
from __future__ import annotations

from torch import nn

# The known kinds. Later techniques may add their own (e.g. "memory_value"): the set is open.
EMBEDDING = "embedding"          # token embedding table
HIDDEN_MATRIX = "hidden_matrix"  # weight matrices inside blocks
HIDDEN_BIAS = "hidden_bias"      # biases and non-norm gains inside blocks
NORM_GAIN = "norm_gain"          # norm gains (block and final norms)
NORM_BIAS = "norm_bias"          # norm biases
OUTPUT_HEAD = "output_head"      # untied LM head
SCALAR = "scalar"                # learnable scalars (temperatures, coefficients)


def tag_linear(linear: nn.Linear, weight: str = HIDDEN_MATRIX, bias: str = HIDDEN_BIAS) -> nn.Linear:
    """Attach tags to a stock nn.Linear (an instance attribute, so it survives FSDP wrapping)."""
    linear.param_tags = {"weight": weight, "bias": bias}
    return linear


def param_tags(model: nn.Module) -> dict[str, str]:
    """Tag of every parameter, by its name in `model.named_parameters()`; raises if one is missing."""
    tags: dict[str, str] = {}
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        local = getattr(module, "param_tags", None)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if id(p) in seen:      # tied weights: the first owner's tag wins
                continue
            if local is None or pname not in local:
                raise KeyError(f"parameter '{full}' of {type(module).__name__} has no tag: "
                               f"add it to {type(module).__name__}.param_tags")
            seen.add(id(p))
            tags[full] = local[pname]
    return tags
