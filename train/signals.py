"""Stop requests by signal, from the first instant of a training process.

The entry points (`ablate`, `python -m train`) call `install()` as their first statement, before
torch and the rest are imported (seconds on a cold node), so a SIGTERM or SIGUSR1 that a
scheduler sends right after launch only sets a flag: the trainer sees it at its first step
boundary, checkpoints and writes REQUEUE. Nothing here imports more than the standard library.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_requested = False
_installed = False


def on_signal(signum, frame) -> None:
    global _requested
    _requested = True            # only a flag: a second signal during a save changes nothing


def install() -> None:
    """Flag-only handlers for SIGTERM / SIGUSR1 for the life of the process."""
    global _installed
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    _installed = True


def installed() -> bool:
    """Whether this process's handlers are ours (a training entry point) rather than a caller's."""
    return _installed and signal.getsignal(signal.SIGTERM) is on_signal


def requested() -> bool:
    return _requested


def reset() -> None:
    global _requested
    _requested = False
