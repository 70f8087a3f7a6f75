"""`python -m train CONFIG [KEY=VALUE ...] [--run-dir DIR] [--resume]` (same as `ablate train`)."""
from train import signals

signals.install()      # first: a stop signal during the imports below only sets the flag

import sys  # noqa: E402

from train.cli import train_main  # noqa: E402

sys.exit(train_main())
