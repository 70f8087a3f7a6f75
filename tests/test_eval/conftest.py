"""One tiny trained run shared by the eval tests (16 steps, checkpoints at 8 and 16)."""
from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path

import pytest
from ablate_testing import TINY, make_cfg

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e '.[eval]')")

SHARED_EVAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "eval"
STEPS = 16


@pytest.fixture(scope="session")
def shared_eval() -> Path:
    """../shared/data/eval (HellaSwag and ARC-Easy); the test skips when it is absent."""
    if not (SHARED_EVAL / "hellaswag").is_dir() or not (SHARED_EVAL / "arc_easy").is_dir():
        pytest.skip(f"{SHARED_EVAL} is absent (../shared not mounted)")
    return SHARED_EVAL


@pytest.fixture(scope="session", autouse=True)
def _offline():
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(k, v)


@pytest.fixture(scope="session")
def eval_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("eval_cache")


@pytest.fixture(scope="session")
def eval_dict(eval_cache) -> dict:
    d = copy.deepcopy(TINY)
    d["data"]["cache_dir"] = str(eval_cache)
    d["train"]["steps"] = STEPS
    d["checkpoint"]["every"] = 8
    return d


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, eval_dict) -> Path:
    """The shared run. Tests that write results must use `fresh_run` (a copy) instead."""
    from train.trainer import train
    run_dir = tmp_path_factory.mktemp("eval_runs") / "tiny"
    assert train(make_cfg(eval_dict), run_dir).status == "done"
    return run_dir


@pytest.fixture
def fresh_run(trained_run, tmp_path) -> Path:
    """A private copy of the trained run without any eval results."""
    dst = tmp_path / "run"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("eval"))
    return dst


@pytest.fixture(scope="session")
def model_and_tok(trained_run):
    from train.data import load_tokenizer
    from train.runtime import load_model
    model, cfg, _ = load_model(trained_run, "latest")
    return model, load_tokenizer(trained_run / "tokenizer")
