"""FSDP2 on 2 gloo ranks: the model is built on the meta device and each rank materialises only
its shard, equal to its slice of a direct build; init_from loads into the sharded model (a DCP
load of each rank's shards), new parameters keeping their fresh init. One torchrun flow."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from ablate_testing import REPO, subprocess_env

SCRIPT = r'''
import json, sys
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

import models
from models.config import model_config
from train import checkpoint as ckpt
from train.config import config_from_dict
from train.parallel import FSDP2Backend, init_distributed

out_dir = sys.argv[1]
info = init_distributed("fsdp2", "cpu", 60.0)
model_dict = {"d_model": 32, "n_layers": 2, "n_heads": 4, "vocab_size": 4099, "max_seq_len": 32,
              "tie_embeddings": False}
cfg = config_from_dict({"device": "cpu", "model": model_dict, "data": {"seq_len": 32}, "parallel": {"backend": "fsdp2"}})
backend = FSDP2Backend(cfg, info, torch.device("cpu"))


def local_slice(full, p):
    shape, offset = compute_local_shape_and_global_offset(full.shape, p.device_mesh, p.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def compare(sharded, reference, skip=()):
    ref = dict(reference.named_parameters())
    rows = {}
    for name, p in sharded.named_parameters():
        local = p.to_local()
        rows[name] = {"local": local.numel(), "full": p.numel(), "rows": p.shape[0],
                      "equal": bool(torch.equal(local, local_slice(ref[name].detach(), p)))}
    return rows


# 1. a sharded meta build equals the direct build's slice on every rank
sharded = backend.build(lambda: models.Decoder(cfg.model, init_seed=7))
meta_left = [n for n, p in sharded.named_parameters() if p.is_meta]
direct = models.Decoder(cfg.model, init_seed=7)
init_rows = compare(sharded, direct)

# 2. init_from into a sharded model: a checkpoint of another model (seed 11, no QK-norm), loaded
#    into an FSDP2 model with QK-norm (new gains allowed: they keep their fresh init of ones)
source = models.Decoder(cfg.model, init_seed=11)
path = f"{out_dir}/ckpt"
dcp.save({"model": source.state_dict()}, checkpoint_id=path)
dist.barrier()
cfg2 = config_from_dict({"device": "cpu", "model": {**model_dict, "qk_norm": True}, "data": {"seq_len": 32},
                        "parallel": {"backend": "fsdp2"}})
backend2 = FSDP2Backend(cfg2, info, torch.device("cpu"))
target = backend2.build(lambda: models.Decoder(cfg2.model, init_seed=7))
report = ckpt.init_from_checkpoint(__import__("pathlib").Path(path), target, allow_new=["*.q_norm.weight", "*.k_norm.weight"])
expected = models.Decoder(cfg2.model, init_seed=7)
with torch.no_grad():
    ref_params = dict(expected.named_parameters())
    for name, p in source.named_parameters():
        ref_params[name].copy_(p)
load_rows = compare(target, expected)
json.dump({"meta_left": meta_left, "init": init_rows, "load": load_rows, "new": sorted(report["new"])},
          open(f"{out_dir}/rank{info.rank}.json", "w"))
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_sharded_meta_init_and_init_from_under_two_ranks(tmp_path, cache_dir):
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    env = subprocess_env(cache_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for got in ranks:
        assert got["meta_left"] == []
        assert all(row["equal"] for row in got["init"].values()), [n for n, r in got["init"].items() if not r["equal"]]
        assert all(row["equal"] for row in got["load"].values()), [n for n, r in got["load"].items() if not r["equal"]]
        assert got["new"] == ["blocks.0.mixer.k_norm.weight", "blocks.0.mixer.q_norm.weight",
                              "blocks.1.mixer.k_norm.weight", "blocks.1.mixer.q_norm.weight"]
    for name, row in ranks[0]["init"].items():       # each rank holds its half (dim-0 chunks) of each parameter
        locals_ = [ranks[r]["init"][name]["local"] for r in (0, 1)]
        assert sum(locals_) == row["full"], name
        assert max(locals_) == -(-row["rows"] // 2) * (row["full"] // row["rows"]), name
