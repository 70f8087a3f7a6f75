"""Entry for the async-checkpoint kill test: `train_with_slow_save.py SECONDS CONFIG [args]` trains
as `python -m train CONFIG [args]` does, with every DCP shard write delayed by SECONDS (in the
background writer), so a kill -9 can land while an async save is in flight."""
import sys
import time

import torch.distributed.checkpoint.filesystem as fs

from train import signals

signals.install()
delay = float(sys.argv[1])
write_data = fs.FileSystemWriter.write_data


def slow_write_data(self, plan, planner):
    time.sleep(delay)
    return write_data(self, plan, planner)


fs.FileSystemWriter.write_data = slow_write_data
import train.cli as cli  # noqa: E402

sys.exit(cli.train_main(sys.argv[2:]))
