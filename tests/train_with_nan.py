"""torchrun entry for fault-injection tests: `train_with_nan.py STEPS CONFIG [args]` trains as
`python -m train CONFIG [args]` does, with NaN losses on the 1-based STEPS ("3" or "3,5")."""
import sys

import train.cli as cli
from ablate_testing import nan_loss

steps = {int(s) for s in sys.argv[1].split(",")}
run_callbacks = cli.run_callbacks
cli.run_callbacks = lambda cfg: run_callbacks(cfg) + [nan_loss(steps)]
sys.exit(cli.train_main(sys.argv[2:]))
