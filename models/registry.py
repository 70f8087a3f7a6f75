"""Name -> class registries, one per architecture slot.

A technique is added as one file that registers a name here; `decoder.py` never grows an
if-chain. Registries also carry an optional config dataclass per name, so each mixer kind can
have its own keys (validated like every other config section).
"""
from __future__ import annotations

import difflib
from typing import Any, Callable

from models import protocols
from models.protocols import check_protocol


class ConfigError(ValueError):
    """A bad config value. `key` is the full dotted path of the culprit; the CLI exits 2."""

    def __init__(self, key: str, message: str):
        self.key = key
        self.message = message
        super().__init__(f"{key}: {message}" if key else message)


def suggest(name: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class Registry:
    """Maps a name to a builder (usually a class) and, optionally, its config dataclass.

    With a `protocol` (models/protocols.py), a builder that lacks one of its members is refused
    at registration, naming the missing members."""

    def __init__(self, slot: str, protocol: type | None = None):
        self.slot = slot
        self.protocol = protocol
        self._items: dict[str, Any] = {}
        self._configs: dict[str, type | None] = {}

    def register(self, name: str, config: type | None = None) -> Callable[[Any], Any]:
        def deco(obj: Any) -> Any:
            if name in self._items:
                raise KeyError(f"{self.slot} '{name}' registered twice")
            if self.protocol is not None:
                check_protocol(obj, self.protocol, f"{self.slot} '{name}' ({getattr(obj, '__name__', obj)!s})")
            self._items[name] = obj
            self._configs[name] = config
            return obj

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def check(self, name: str, key: str) -> None:
        if name not in self._items:
            raise ConfigError(
                key,
                f"unknown {self.slot} '{name}'{suggest(name, self.names())}; "
                f"available: {', '.join(self.names())}",
            )

    def get(self, name: str, key: str = "") -> Any:
        self.check(name, key)
        return self._items[name]

    def config_class(self, name: str, key: str = "") -> type | None:
        self.check(name, key)
        return self._configs[name]

    def __contains__(self, name: str) -> bool:
        return name in self._items


MIXERS = Registry("mixer", protocols.Mixer)
FFNS = Registry("ffn kind", protocols.FFN)
ACTIVATIONS = Registry("activation", protocols.ActivationFactory)
NORMS = Registry("norm", protocols.Norm)
PARAMETERIZATIONS = Registry("parameterization", protocols.Parameterization)
MEMORIES = Registry("memory layer", protocols.MemoryLayer)
