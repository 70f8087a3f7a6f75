"""A private two-node Slurm cluster for the session (launch/local_slurm.sh), and the launch tests'
shared config. Without Slurm (and not root to install it) the Slurm tests skip; as root (CI) a
cluster that does not come up is a failure."""
from __future__ import annotations

import copy
import os
import subprocess
from pathlib import Path

import pytest
from ablate_testing import REPO, TINY, subprocess_env

SCRIPT = REPO / "launch" / "local_slurm.sh"


@pytest.fixture(scope="session")
def launch_dict(tmp_path_factory) -> dict:
    """TINY with its own data cache, no progress bar, checkpoints every 4 steps."""
    d = copy.deepcopy(TINY)
    d["data"]["cache_dir"] = str(tmp_path_factory.mktemp("launch_cache"))
    d["train"]["log_every"] = 2
    return d


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> dict:
    """{"env": the environment with SLURM_CONF, "dir": the cluster's dir}; stopped at the end."""
    root = tmp_path_factory.mktemp("slurm")
    out = subprocess.run(["bash", str(SCRIPT), "start", str(root)], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        message = f"the local Slurm cluster did not start (rc {out.returncode}): {out.stderr.strip()[-2000:]}"
        if os.geteuid() == 0:
            pytest.fail(message)            # CI runs as root: Slurm must work there
        pytest.skip(message)
    env = {**subprocess_env(Path(root) / "unused-cache"), "SLURM_CONF": str(Path(root) / "slurm.conf")}
    env.pop("ABLATE_CACHE")
    yield {"env": env, "dir": Path(root)}
    subprocess.run(["bash", str(SCRIPT), "stop", str(root)], capture_output=True, timeout=120)
