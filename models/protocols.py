"""The interface of each architecture slot, as `typing.Protocol`s.

`models.registry` checks a class against its slot's protocol when it is registered, so a
technique that forgets a member fails at import (naming the class and the member), not deep
inside a training run. The decoder relies only on these members.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from models.config import ModelConfig
    from models.context import MixerContext
    from models.tags import TagSpec

class Mixer(Protocol):
    """`model.layers.mixers.<letter>.kind`: built as cls(model_cfg, mixer_cfg, layer_idx)."""

    def forward(self, x: torch.Tensor, ctx: MixerContext, cache: Any = None) -> Any:
        """(B, T, d) -> (B, T, d), or (that, Aux). `cache` is what new_cache() made (decoding)."""

    def new_cache(self) -> Any:
        """An empty per-layer decode cache."""

    @property
    def kernel(self) -> str:
        """The code path the training forward takes (e.g. `sdpa_causal`, `torch_chunk`, `fla_chunk`):
        recorded in the run's `model` event, so a speed difference can be traced to its kernel."""

    @staticmethod
    def flops_per_token(cfg: ModelConfig, mixer_cfg: Any, seq_len: int) -> float:
        """Training FLOPs per token beyond the parameter matmuls (attention scores, scans)."""


class FFN(Protocol):
    """`model.ffn.kind`: built as cls(model_cfg, layer_idx)."""

    def forward(self, x: torch.Tensor, ctx: MixerContext | None = None) -> Any:
        """(B, T, d) -> (B, T, d), or (that, Aux)."""

    @staticmethod
    def hidden_width(cfg: ModelConfig) -> int:
        """The hidden width this config resolves to (`hidden: auto` rules)."""

    @staticmethod
    def check_activation(name: str, key: str) -> None:
        """Raise ConfigError(key, ...) when `name` is not an activation this kind accepts."""


class MemoryLayer(Protocol):
    """`model.memory.kind`: replaces the FFN of the layers in `model.memory.layers`;
    built as cls(model_cfg, layer_idx)."""

    def forward(self, x: torch.Tensor, ctx: MixerContext | None = None) -> Any:
        """(B, T, d) -> (B, T, d), or (that, Aux)."""


class ActivationFactory(Protocol):
    """`model.ffn.activation`: factory(hidden_dim, model_cfg, layer_idx) -> nn.Module."""

    def __call__(self, dim: int, cfg: ModelConfig | None = None, layer_idx: int = 0) -> nn.Module: ...


class Norm(Protocol):
    """`model.norm.block` / `model.norm.final`: built as cls(dim, eps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor: ...

    def reset_parameters(self) -> None:
        """Set the module's own init (gains to one, ...); called by the decoder's init."""


class Parameterization(Protocol):
    """`model.param.kind`: built as cls(model_cfg). Read by the decoder (multipliers), its init
    (std per tag spec) and the optimizer group builder (per-spec rules)."""

    @property
    def residual_multiplier(self) -> float:
        """m in h += m * branch(norm(h)) (CompleteP: L_base / L)."""

    @property
    def input_multiplier(self) -> float:
        """Multiplies the token embeddings (muP's alpha_in)."""

    @property
    def output_multiplier(self) -> float:
        """Multiplies the final hidden state before the LM head (muP: alpha_out / m_N)."""

    def attention_scale(self, head_dim: int) -> float | None:
        """The attention logit scale (None: 1/sqrt(head_dim), SDPA's default)."""

    def init_std(self, spec: TagSpec, residual_out: bool = False) -> float:
        """Std of the normal init for parameters whose spec says init: normal."""

    def group_rule(self, spec: TagSpec) -> Any:
        """The GroupRule (multipliers, or an absolute lr) for parameters of this spec."""


def protocol_members(proto: type) -> list[str]:
    """The members a class must have to satisfy `proto` (methods, properties, attributes)."""
    names: set[str] = set()
    for base in proto.__mro__:
        if base in (object, Protocol) or base.__name__ in ("Protocol", "Generic"):
            continue
        for name in list(vars(base)) + list(getattr(base, "__annotations__", {})):
            if name == "__call__" or not name.startswith("_"):
                names.add(name)
    return sorted(names)


def check_protocol(obj: Any, proto: type, what: str) -> None:
    """Raise TypeError naming `what` and every member of `proto` that `obj` lacks."""
    if proto is ActivationFactory:
        if not callable(obj):
            raise TypeError(f"{what} is not callable: an activation is a factory (dim, cfg, layer_idx) -> nn.Module")
        return
    missing = [m for m in protocol_members(proto) if not hasattr(obj, m)]
    if missing:
        raise TypeError(f"{what} does not implement the {proto.__name__} protocol: missing "
                        f"{', '.join(missing)} (see models/protocols.py)")
