"""The in-training hook: leaves the trainer's state alone; lockstep under 2 gloo ranks (FSDP2)."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from ablate_testing import REPO, make_cfg, subprocess_env, train_rows

from eval.hook import eval_due, run_in_training_eval
from eval.runner import EvalSpec, evaluate_run
from train.rundir import RunDir

HOOK = {"eval__every": 8, "eval__tasks": ["ablate_val_ppl"], "eval__limit": 2}


def test_hook_leaves_state_and_logs(fresh_run, eval_dict, model_and_tok):
    from train.runtime import load_model
    model, _, step = load_model(fresh_run, "latest")
    cfg = make_cfg(eval_dict, **HOOK)
    assert not eval_due(cfg, 3) and eval_due(cfg, 8) and eval_due(cfg, cfg.train.steps)
    assert not eval_due(make_cfg(eval_dict, eval__every=8), 8)           # no tasks: never
    model.train()
    params = {k: v.clone() for k, v in model.state_dict().items()}
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    before = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    random.seed(5), np.random.seed(5), torch.manual_seed(5)

    assert run_in_training_eval(model, cfg, RunDir(fresh_run), 3) is None
    res = run_in_training_eval(model, cfg, RunDir(fresh_run), step)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == before
    assert model.training and all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert res["metrics"]["ablate_val_ppl"]["byte_perplexity"]["value"] > 1
    assert {r["step"] for r in train_rows(fresh_run, "eval")} == {step}
    # the same settings from the CLI path reuse the hook's file
    [again] = evaluate_run(fresh_run, "latest", EvalSpec(["ablate_val_ppl"], limit=2))
    assert again["reused"] and again["hash8"] == res["hash8"]


def test_training_with_hook_has_same_losses(trained_run, eval_dict, tmp_path):
    """The InTrainingEval callback, handed to the trainer as the CLI does (train.cli.run_callbacks)."""
    from train.cli import run_callbacks
    from train.trainer import train
    run_dir = tmp_path / "hooked"
    cfg = make_cfg(eval_dict, **HOOK)
    assert train(cfg, run_dir, callbacks=run_callbacks(cfg)).status == "done"
    assert [r["loss"] for r in train_rows(run_dir)] == [r["loss"] for r in train_rows(trained_run)]
    assert [r["val_loss"] for r in train_rows(run_dir, "val")] == [r["val_loss"] for r in train_rows(trained_run, "val")]
    assert sorted({r["step"] for r in train_rows(run_dir, "eval")}) == [8, 16]
    assert len(list((run_dir / "eval").glob("step-*.json"))) == 2


FSDP_SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from lm_eval.api.instance import Instance
from eval.adapter import AblateLM
from eval.hook import run_in_training_eval
from train.data import load_tokenizer
from train.runtime import load_model
from train.rundir import RunDir

run_dir, out = sys.argv[1], sys.argv[2]
dist.init_process_group("gloo")
model, cfg, step = load_model(run_dir, "latest")
for block in model.blocks:
    fully_shard(block)
fully_shard(model)
cfg.eval.every, cfg.eval.tasks, cfg.eval.limit = 8, ["ablate_val_ppl"], 2
res = run_in_training_eval(model, cfg, RunDir(run_dir), step)
tok = load_tokenizer(RunDir(run_dir).tokenizer_dir)
lm = AblateLM(model, tok, batch_size=2)
rank = dist.get_rank()
# different stop strings per rank: generation stops at different steps, the loop stays in lockstep
gens = lm.generate_until([Instance("generate_until", {}, (c, {"until": ["zzz" if rank else " "], "max_gen_toks": 6}), i)
                          for i, c in enumerate(["def ", "import os\n", "x"])])
lls = lm.loglikelihood([Instance("loglikelihood", {}, ("def f(x):", " return x"), 0)])
dist.barrier()
if rank == 0:
    json.dump({"metrics": res["metrics"], "hash8": res["hash8"], "lls": lls, "gens": gens}, open(out, "w"))
dist.destroy_process_group()
'''


def test_hook_lockstep_under_fsdp2_gloo(fresh_run, trained_run, tmp_path, eval_cache):
    """2 CPU ranks, FSDP2-sharded model: the hook and the adapter finish (no deadlock) with the
    single-process numbers."""
    pytest.importorskip("torch.distributed.fsdp", reason="no FSDP2").fully_shard
    script = tmp_path / "fsdp_eval.py"
    script.write_text(FSDP_SCRIPT)
    out = tmp_path / "out.json"
    env = subprocess_env(eval_cache)
    env["PYTHONPATH"] = f"{REPO}:{REPO / 'tests'}:{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(fresh_run), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    [single] = evaluate_run(trained_run, "latest", EvalSpec(["ablate_val_ppl"], limit=2))
    assert got["hash8"] == single["hash8"]
    for k, m in single["metrics"]["ablate_val_ppl"].items():
        assert got["metrics"]["ablate_val_ppl"][k]["value"] == pytest.approx(m["value"], rel=1e-4)
    assert len(got["gens"]) == 3 and len(got["lls"]) == 1


@pytest.mark.slow
def test_trainer_hook_under_fsdp2(eval_dict, tmp_path, eval_cache):
    """The trainer's own FSDP2 backend with the hook on 2 gloo ranks: same losses as without."""
    import yaml
    cfg = dict(eval_dict)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = subprocess_env(eval_cache)
    losses = {}
    for name, extra in {"plain": [], "hooked": ["eval.every=8", "eval.tasks=[ablate_val_ppl]", "eval.limit=2"]}.items():
        run_dir = tmp_path / name
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "train", str(path), "parallel.backend=fsdp2", "train.micro_batch=4", *extra,
               "--run-dir", str(run_dir)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        losses[name] = [r["loss"] for r in train_rows(run_dir)]
    assert losses["plain"] == losses["hooked"]
    assert {r["step"] for r in train_rows(tmp_path / "hooked", "eval")} == {8, 16}
