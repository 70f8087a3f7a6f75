"""Shared fixtures: one small config, one data cache and one finished run reused by many tests."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
from ablate_testing import TINY, make_cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ablate_cache")


@pytest.fixture(scope="session")
def tiny_dict(cache_dir) -> dict:
    d = copy.deepcopy(TINY)
    d["data"]["cache_dir"] = str(cache_dir)
    return d


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, tiny_dict) -> Path:
    """One uninterrupted 12-step run; resume tests compare against its losses."""
    from train.trainer import train
    run_dir = tmp_path_factory.mktemp("runs") / "base"
    result = train(make_cfg(tiny_dict), run_dir)
    assert result.status == "done"
    return run_dir
