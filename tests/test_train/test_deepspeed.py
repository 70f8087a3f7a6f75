"""DeepSpeed ZeRO 1/2/3 on 2 gloo ranks (torchrun in subprocesses): loss parity with one process,
exact resume per stage, consolidation (zero_to_fp32, no process group), refused resumes and
combinations, the finite guard, clean shutdown."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ablate_testing import DIST, REPO, copy_run, make_cfg, rewind, subprocess_env, torchrun, train_rows, write_config

from models.registry import ConfigError
from train import checkpoint as ckpt

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.slow

STAGES = (1, 2, 3)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config file, a shared data cache, the single-process reference run and a cache of
    the 2-rank run of each stage."""
    from train.trainer import train
    root = tmp_path_factory.mktemp("ds")
    cache = root / "cache"
    data = {**DIST, "data": {**DIST["data"], "cache_dir": str(cache)}}
    cfg_path = write_config(root / "ds.yaml", data)
    reference = root / "reference"
    train(make_cfg(data), reference)
    return {"root": root, "cfg": cfg_path, "data": data, "cache": cache, "reference": reference, "runs": {}}


def ds(stage: int) -> tuple[str, str]:
    return "parallel.backend=deepspeed", f"parallel.zero_stage={stage}"


def stage_run(setup, stage: int) -> Path:
    if stage not in setup["runs"]:
        run = setup["root"] / f"zero{stage}"
        code, out = torchrun(setup, run, *ds(stage))
        assert code == 0, out                       # also: no SIGABRT at exit (engine.destroy + gc)
        assert "SIGABRT" not in out and "terminate called" not in out
        setup["runs"][stage] = run
    return setup["runs"][stage]


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run)]


@pytest.mark.parametrize("stage", STAGES)
def test_stage_matches_single_process(setup, stage):
    run = stage_run(setup, stage)
    ref = losses(setup["reference"])
    got = losses(run)
    assert len(got) == len(ref) == 10
    for x, y in zip(got, ref):
        assert math.isclose(x, y, rel_tol=1e-5), (got, ref)
    step10 = run / "checkpoints" / "step-00000010"
    assert ckpt.is_deepspeed(step10) and (step10 / "COMPLETE").exists()
    assert (step10 / "trainer_state.pt").exists() and (step10 / "rng-rank00001.pt").exists()
    names = {p.name for p in (step10 / ckpt.DS_DIR / ckpt.DS_TAG).iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names


@pytest.mark.parametrize("stage", STAGES)
def test_exact_resume_same_world_size(setup, stage, tmp_path):
    full = stage_run(setup, stage)
    run = copy_run(full, tmp_path / "run")
    rewind(run, 5)
    code, out = torchrun(setup, run, *ds(stage))
    assert code == 0, out
    assert losses(run) == losses(full)
    assert [r["samples"] for r in train_rows(run)] == [[8 * i, 8 * i + 7] for i in range(10)]


@pytest.mark.parametrize("stage", (1, 3))
def test_consolidate_equals_live_model(setup, stage, tmp_path):
    """`ablate checkpoint consolidate` reads a ZeRO checkpoint without a process group; the
    consolidated model gives the validation loss the 2 live ranks logged at step 10."""
    run = stage_run(setup, stage)
    out = tmp_path / "full.pt"
    proc = subprocess.run([sys.executable, "-m", "train.cli", "checkpoint", "consolidate", str(run),
                           "--step", "10", "--out", str(out)], cwd=REPO, env=subprocess_env(setup["cache"]),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import models
    from train.data import prepare_data, val_batches
    from train.runtime import load_run_config
    from train.trainer import evaluate_loss
    cfg = load_run_config(run)
    data = prepare_data(cfg, progress=False)
    batches = val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.val_batches)
    live = train_rows(run, "val")[-1]["val_loss"]
    model = models.Decoder(cfg.model)
    model.load_state_dict(torch.load(out))
    assert math.isclose(evaluate_loss(model, batches, torch.device("cpu"), cfg), live, rel_tol=1e-6)
    other = models.Decoder(cfg.model)                 # generate / eval / init_from read it too
    ckpt.load_model_weights(run / "checkpoints" / "step-00000010", other)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_other_world_size_and_backend_are_refused(setup, tmp_path):
    run = copy_run(stage_run(setup, 2), tmp_path / "run")
    rewind(run, 5)
    code, out = torchrun(setup, run, *ds(2), nproc=1)
    assert code != 0
    assert "written by 2 ranks" in out and "parallel.backend" in out
    code, out = torchrun(setup, run, "parallel.backend=fsdp2")
    assert code != 0 and "is a DeepSpeed checkpoint" in out


def test_nonfinite_loss_is_skipped(setup, tmp_path):
    run = tmp_path / "skip"
    code, out = torchrun(setup, run, *ds(2), "train.steps=5", "checkpoint.every=0", nan_steps="3")
    assert code == 0, out
    assert [e["step"] for e in train_rows(run, "event") if e["event"] == "skip_nonfinite"] == [3]
    rows = train_rows(run)
    assert all(math.isfinite(r["loss"]) for r in rows if r["step"] != 3)
    assert rows[2]["grad_norm"] is None                     # no step taken: DeepSpeed never clipped
    assert all(math.isfinite(r["grad_norm"]) for r in rows if r["step"] != 3)


def test_unsupported_combinations_are_refused():
    from train.parallel import DistInfo, make_backend
    with pytest.raises(ConfigError, match="zero_stage"):
        make_cfg(DIST, parallel__backend="deepspeed", parallel__zero_stage=4)
    with pytest.raises(ConfigError, match="reduce_dtype"):
        make_cfg(DIST, parallel__backend="deepspeed", parallel__reduce_dtype="bf16")
    with pytest.raises(ConfigError, match="cpu_offload"):
        make_cfg(DIST, parallel__backend="deepspeed", parallel__cpu_offload=True)
    cfg = make_cfg(DIST, parallel__backend="deepspeed", optim__name="muon")
    with pytest.raises(ConfigError, match="muon"):
        make_backend(cfg, DistInfo(), torch.device("cpu"))
