"""The `ablate` console script. For `ablate train` the stop-signal handlers go in first, before
torch and the rest are imported (train/signals.py); every other command keeps the default
signal behaviour (SIGTERM ends it)."""
from __future__ import annotations

import sys


def main() -> int:
    if sys.argv[1:2] == ["train"]:
        from train import signals
        signals.install()
    from train.cli import main as cli_main
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
