"""The data pipeline's one exception type."""
from __future__ import annotations

from models.registry import ConfigError


class DataError(ConfigError):
    """Bad data input: a missing path, an empty corpus, bad bytes, a stale cache...

    It is a ConfigError so the CLI exits 2 with the message; `key` is the config key or the
    file path at fault, so the user knows what to fix.
    """
