"""Memory layers under FSDP2 on 2 gloo ranks: the value table sharded by columns (a DTensor left
out of fully_shard) gives the single-process losses, is saved sharded, and a 2-rank checkpoint
resumes on 1 rank. One torchrun flow (tests/memory_sharded_flow.py)."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
from ablate_testing import DIST, REPO, copy_run, make_cfg, rewind, subprocess_env, train_rows, write_config

pytestmark = pytest.mark.slow

# two memory layers reading one shared table of 8^2 = 64 slots, v_dim = d_model = 32
MEMORY = {"layers": [0, 1], "n_keys": 8, "k_dim": 16, "heads": 2, "knn": 4, "share_values": True}


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run)]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
    from train.trainer import train
    root = tmp_path_factory.mktemp("memory_sharded")
    data = {**DIST, "model": {**DIST["model"], "memory": MEMORY},
            "data": {**DIST["data"], "cache_dir": str(root / "cache")}}
    cfg = write_config(root / "memory.yaml", data)
    reference = root / "reference"
    assert train(make_cfg(data), reference).status == "done"
    run = root / "fsdp2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           str(REPO / "tests" / "memory_sharded_flow.py"), str(cfg), "parallel.backend=fsdp2", "--run-dir", str(run)]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(root / "cache"), capture_output=True, text=True,
                          timeout=300)
    return {"root": root, "data": data, "reference": reference, "run": run, "proc": proc}


def test_sharded_read_equals_the_dense_one_in_float64(flow):
    out = flow["proc"].stdout + flow["proc"].stderr
    assert flow["proc"].returncode == 0, out
    assert "sharded read: equal to the dense read" in out


def test_two_ranks_match_one_process_and_the_table_is_saved_sharded(flow):
    from torch.distributed.checkpoint import FileSystemReader
    assert flow["proc"].returncode == 0, flow["proc"].stdout + flow["proc"].stderr
    a, b = losses(flow["run"]), losses(flow["reference"])
    assert len(a) == len(b) == 10 and all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b)), (a, b)
    meta = FileSystemReader(str(flow["run"] / "checkpoints" / "step-00000010")).read_metadata()
    table = meta.state_dict_metadata["model.shared.memory.weight"]
    assert list(table.size) == [64, 32]
    assert sorted(tuple(c.offsets) for c in table.chunks) == [(0, 0), (0, 16)]    # one column block per rank


def test_a_two_rank_checkpoint_resumes_on_one_rank(flow, tmp_path):
    from train.trainer import train
    assert flow["proc"].returncode == 0, flow["proc"].stdout + flow["proc"].stderr
    run = copy_run(flow["run"], tmp_path / "one_rank")
    rewind(run, 5)
    assert train(make_cfg(flow["data"]), run).status == "done"        # parallel.backend none, world size 1
    a, b = losses(run), losses(flow["reference"])
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b)), (a, b)
