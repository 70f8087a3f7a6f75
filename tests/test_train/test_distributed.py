"""DDP and FSDP2 on 2 gloo ranks (torchrun in subprocesses): loss parity with one process,
exact resume, resume across world sizes, consolidation, stop flows, rank death, finite guard,
mismatched configs."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ablate_testing import (DIST, REPO, copy_run, make_cfg, rewind, subprocess_env, torchrun, train_rows,
                            wait_for, write_config)

from train import checkpoint as ckpt

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The config file, a shared data cache and the single-process reference run."""
    from train.trainer import train
    root = tmp_path_factory.mktemp("dist")
    cache = root / "cache"
    data = {**DIST, "data": {**DIST["data"], "cache_dir": str(cache)}}
    cfg_path = write_config(root / "dist.yaml", data)
    reference = root / "reference"
    train(make_cfg(data), reference)
    return {"root": root, "cfg": cfg_path, "data": data, "cache": cache, "reference": reference}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run)]


def assert_close(a: list[float], b: list[float], rel: float = 1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert math.isclose(x, y, rel_tol=rel), (a, b)


@pytest.fixture(scope="module")
def fsdp_run(setup):
    run = setup["root"] / "fsdp2"
    code, out = torchrun(setup, run, "parallel.backend=fsdp2")
    assert code == 0, out
    return run


def test_ddp_matches_single_process(setup):
    """Also the 2-rank flow of checkpoint.async_save (its own gloo group, COMPLETE after both ranks)."""
    run = setup["root"] / "ddp"
    code, out = torchrun(setup, run, "parallel.backend=ddp", "checkpoint.async_save=true")
    assert code == 0, out
    assert_close(losses(run), losses(setup["reference"]))
    assert out.count("run dir:") == 1            # only rank 0 reports
    complete = ckpt.complete_checkpoints(run / "checkpoints")
    assert [s for s, _ in complete] == [5, 10]
    for _, path in complete:
        ckpt.verify_checkpoint(path)
        assert (path / "rng-rank00001.pt").exists()


def test_norm_removal_under_fsdp2_matches_single_process(setup):
    """LayerNorm removal (train/callbacks/norm_removal.py) on 2 FSDP2 ranks: each rank sees half of
    every step's batch, and the frozen stds, all-reduced at capture, and the losses equal one
    process's."""
    from train.trainer import train
    removal = {"start_step": 1, "gap_ffn": 1, "gap_qk": 1, "gap_v": 1, "final_after": 1, "eot_after": 1,
               "bos_after": 1}
    over = {"init_from": str(setup["reference"]), "model": {**setup["data"]["model"], "norm": {"removal": removal}}}
    single = setup["root"] / "removal_single"
    assert train(make_cfg({**setup["data"], **over}), single).status == "done"
    run = setup["root"] / "removal_fsdp2"
    code, out = torchrun(setup, run, "parallel.backend=fsdp2", f"init_from={setup['reference']}",
                         "model.norm.removal={start_step: 1, gap_ffn: 1, gap_qk: 1, gap_v: 1, final_after: 1, "
                         "eot_after: 1, bos_after: 1}")
    assert code == 0, out

    def stds(r: Path) -> dict[str, float]:
        return {e["norm"]: e["std"] for e in train_rows(r, "event") if e["event"] == "norm_switch" and "norm" in e}
    want, got = stds(single), stds(run)
    assert len(want) == 7 and set(got) == set(want)
    for name in want:
        assert math.isclose(got[name], want[name], rel_tol=1e-6), (name, got[name], want[name])
    assert_close(losses(run), losses(single))


def test_fsdp2_matches_single_process_and_checkpoints_are_sharded(setup, fsdp_run):
    assert_close(losses(fsdp_run), losses(setup["reference"]))
    step10 = fsdp_run / "checkpoints" / "step-00000010"
    assert {p.name for p in step10.glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert (step10 / "rng-rank00001.pt").exists() and (step10 / "COMPLETE").exists()
    assert [r["samples"] for r in train_rows(fsdp_run)] == [[8 * i, 8 * i + 7] for i in range(10)]


def test_fsdp2_exact_resume_same_world_size(setup, fsdp_run, tmp_path):
    run = copy_run(fsdp_run, tmp_path / "run")
    rewind(run, 5)
    code, out = torchrun(setup, run, "parallel.backend=fsdp2")
    assert code == 0, out
    assert losses(run) == losses(fsdp_run)


def test_fsdp2_resume_two_ranks_to_one(setup, fsdp_run, tmp_path):
    from train.trainer import train
    run = copy_run(fsdp_run, tmp_path / "run")
    rewind(run, 5)
    train(make_cfg(setup["data"], parallel__backend="fsdp2"), run)
    assert_close(losses(run), losses(fsdp_run))
    assert [r["samples"] for r in train_rows(run)][5:] == [[8 * i, 8 * i + 7] for i in range(5, 10)]


def test_resume_one_rank_to_two(setup, tmp_path):
    from train.trainer import train
    run = tmp_path / "grow"
    one = make_cfg({**setup["data"], "train": {**setup["data"]["train"], "steps": 10}},
                   parallel__backend="fsdp2")
    train(one, run)
    rewind(run, 5)
    code, out = torchrun(setup, run, "parallel.backend=fsdp2")
    assert code == 0, out
    assert_close(losses(run), losses(setup["reference"]))


def test_consolidate_equals_sharded_model(setup, fsdp_run, tmp_path):
    out = tmp_path / "full.pt"
    proc = subprocess.run([sys.executable, "-m", "train.cli", "checkpoint", "consolidate", str(fsdp_run),
                           "--step", "10", "--out", str(out)], cwd=REPO, env=subprocess_env(setup["cache"]),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import models
    from train.data import prepare_data, val_batches
    from train.runtime import load_run_config
    from train.trainer import evaluate_loss
    cfg = load_run_config(fsdp_run)
    model = models.Decoder(cfg.model)
    model.load_state_dict(torch.load(out))
    data = prepare_data(cfg, progress=False)
    batches = val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.val_batches)
    val = evaluate_loss(model, batches, torch.device("cpu"), cfg)
    sharded_val = train_rows(fsdp_run, "val")[-1]["val_loss"]    # computed by the 2 sharded ranks
    assert math.isclose(val, sharded_val, rel_tol=1e-6)


def test_stop_file_and_sigusr1_to_one_rank(setup, tmp_path):
    run = tmp_path / "stop"
    long = ("train.steps=400", "checkpoint.every=0", "parallel.backend=fsdp2")
    proc = torchrun(setup, run, *long, wait=False)
    wait_for(lambda: (run / "metrics.jsonl").exists() and len(train_rows(run)) >= 3, proc)
    (run / "STOP").write_text("")
    assert proc.wait(timeout=60) == 0
    assert (run / "REQUEUE").exists() and not (run / "STOP").exists()
    first = ckpt.latest_checkpoint(run / "checkpoints")[0]

    proc = torchrun(setup, run, *long, wait=False)
    wait_for(lambda: len(train_rows(run)) >= first + 3, proc)
    worker = _worker_pids(proc.pid)[-1]             # one rank only: the ranks must agree
    os.kill(worker, signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0
    second = ckpt.latest_checkpoint(run / "checkpoints")[0]
    assert second > first and (run / "REQUEUE").exists()
    assert [r["step"] for r in train_rows(run)] == list(range(1, second + 1))


def test_killed_rank_then_resume(setup, tmp_path):
    run = tmp_path / "killed"
    long = ("train.steps=60", "checkpoint.every=5", "parallel.backend=ddp", "parallel.timeout_s=30")
    proc = torchrun(setup, run, *long, wait=False)
    wait_for(lambda: (run / "checkpoints" / "step-00000010" / "COMPLETE").exists(), proc)
    os.kill(_worker_pids(proc.pid)[-1], signal.SIGKILL)
    t0 = time.time()
    assert proc.wait(timeout=60) != 0
    assert time.time() - t0 < 30                    # the surviving rank did not hang
    code, out = torchrun(setup, run, *long)
    assert code == 0, out
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert [r["samples"] for r in rows] == [[8 * i, 8 * i + 7] for i in range(60)]


def test_nonfinite_skip_and_halt_under_two_ranks(setup, tmp_path):
    run = tmp_path / "skip"
    code, out = torchrun(setup, run, "parallel.backend=ddp", nan_steps="3")
    assert code == 0, out
    assert [e["step"] for e in train_rows(run, "event") if e["event"] == "skip_nonfinite"] == [3]
    run = tmp_path / "halt"
    code, out = torchrun(setup, run, "parallel.backend=ddp", "train.nonfinite=halt", nan_steps="3")
    assert code != 0
    assert "non-finite" in (run / "FAILED").read_text()


def test_mismatched_configs_are_refused(setup, tmp_path):
    script = tmp_path / "per_rank.py"
    script.write_text("import os, sys\nfrom train.cli import main\n"
                      f"sys.exit(main(['train', {str(setup['cfg'])!r}, 'parallel.backend=ddp',\n"
                      "                'optim.lr=' + str(0.01 * (1 + int(os.environ['RANK']))),\n"
                      f"                '--run-dir', {str(tmp_path / 'mismatch')!r}]))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                           str(script)], cwd=REPO, env=subprocess_env(setup["cache"]),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "ranks resolved different configs" in proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- helpers
def _worker_pids(agent_pid: int) -> list[int]:
    """The worker processes torchrun's agent started (its children), oldest first."""
    out = subprocess.run(["pgrep", "-P", str(agent_pid)], capture_output=True, text=True).stdout.split()
    return sorted(int(p) for p in out)


def test_hsdp_replicate_mesh_matches(setup, tmp_path):
    run = tmp_path / "hsdp"
    code, out = torchrun(setup, run, "parallel.backend=fsdp2", "parallel.replicate=2")
    assert code == 0, out
    assert_close(losses(run), losses(setup["reference"]))
