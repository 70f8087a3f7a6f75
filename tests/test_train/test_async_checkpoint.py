"""`checkpoint.async_save`: checkpoints written in the background give the same run (losses,
complete checkpoints, exact resume), and a kill -9 while an async save is in flight resumes from
the last complete checkpoint."""
from __future__ import annotations

import subprocess
import sys
import time

import yaml
from ablate_testing import REPO, copy_run, make_cfg, rewind, subprocess_env, train_rows, wait_for

from train import checkpoint as ckpt
from train.trainer import train

OVER = dict(train__steps=8, checkpoint__every=2, train__val_every=0)


def _losses(run):
    return {r["step"]: r["loss"] for r in train_rows(run)}


def test_async_saves_give_the_same_run_and_resume_exactly(tiny_dict, tmp_path):
    sync, asyn = tmp_path / "sync", tmp_path / "async"
    assert train(make_cfg(tiny_dict, **OVER), sync).status == "done"
    assert train(make_cfg(tiny_dict, **OVER, checkpoint__async_save=True), asyn).status == "done"
    assert _losses(asyn) == _losses(sync)
    steps = [s for s, _ in ckpt.complete_checkpoints(asyn / "checkpoints")]
    assert steps == [s for s, _ in ckpt.complete_checkpoints(sync / "checkpoints")] == [2, 4, 6, 8]
    for _, path in ckpt.complete_checkpoints(asyn / "checkpoints"):
        ckpt.verify_checkpoint(path)
    saved = [e for e in train_rows(asyn, "event") if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [2, 4, 6, 8] and all("blocking_seconds" in e for e in saved)
    resumed = copy_run(asyn, tmp_path / "resumed")
    rewind(resumed, 6)
    assert train(make_cfg(tiny_dict, **OVER, checkpoint__async_save=True), resumed).status == "done"
    assert _losses(resumed) == _losses(sync)


def test_kill_during_an_async_save_resumes_from_the_last_complete(tiny_dict, cache_dir, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict))
    reference = tmp_path / "reference"
    assert train(make_cfg(tiny_dict, **OVER), reference).status == "done"
    run = tmp_path / "run"
    over = ["train.steps=8", "checkpoint.every=2", "train.val_every=0", "checkpoint.async_save=true"]
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "train_with_slow_save.py"), "1.5", str(cfg_path),
                             *over, "--run-dir", str(run)], cwd=REPO, env=subprocess_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpts = run / "checkpoints"
    # step 2's save completed, step 4's is being written in the background: kill it there
    wait_for(lambda: (ckpts / "step-00000002" / "COMPLETE").exists() and (ckpts / ".tmp-step-00000004").exists(),
             proc)
    proc.kill()
    proc.wait(timeout=30)
    assert not (ckpts / "step-00000004" / "COMPLETE").exists()
    assert ckpt.latest_checkpoint(ckpts)[0] == 2
    time.sleep(0.1)
    assert train(make_cfg(tiny_dict, **OVER, checkpoint__async_save=True), run).status == "done"
    assert _losses(run) == _losses(reference)
