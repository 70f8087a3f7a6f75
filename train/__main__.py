"""`python -m train CONFIG [KEY=VALUE ...] [--run-dir DIR] [--resume]` (same as `ablate train`)."""
import sys

from train.cli import train_main

sys.exit(train_main())
