"""Every shipped config resolves; the parameter counts in the base configs' comments are true;
the small CLI commands work end to end on a finished tiny run."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ablate_testing import REPO, subprocess_env

import models
from models.flops import count_params, flops_per_token
from train.config import load_config

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO / "configs")))
def test_every_config_resolves(path: Path, tmp_path: Path):
    if "sweeps" in path.parts:             # every run of the sweep (nothing is written)
        from launch.sweep import expand
        cfgs = [r.cfg for r in expand(path, tmp_path)[2]]
    else:
        cfgs = [load_config(path)]
    for cfg in cfgs:
        cfg.model.vocab_size = cfg.resolved_vocab_size()
        with torch.device("meta"):
            models.Decoder(cfg.model)


@pytest.mark.parametrize("name", ["tiny", "20m", "125m", "350m", "1b"])
def test_base_config_parameter_counts_match_comment(name: str):
    path = REPO / "configs" / "base" / f"{name}.yaml"
    m = re.search(r"# parameters: ([\d,]+) .*non-embedding ([\d,]+)\)", path.read_text())
    assert m, f"{path} lacks its '# parameters:' comment"
    total, non_emb = (int(g.replace(",", "")) for g in m.groups())
    cfg = load_config(path)
    cfg.model.vocab_size = cfg.resolved_vocab_size()
    with torch.device("meta"):
        model = models.Decoder(cfg.model)
    counts = count_params(model)
    assert (counts.total, counts.non_embedding) == (total, non_emb)


def test_350m_shape_is_the_benchmark_shape():
    cfg = load_config(REPO / "configs" / "base" / "350m.yaml")
    from models.ffn import GLU
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.vocab_size) == (1024, 24, 32768)
    assert GLU.hidden_width(cfg.model) == 2816


def test_flops_per_token_formula():
    cfg = load_config(REPO / "configs" / "base" / "tiny.yaml", ["model.vocab_size=4096"])
    model = models.Decoder(cfg.model)
    d, L, V, T, F = 128, 4, 4096, 128, 384
    matmul = L * (4 * d * d + 3 * d * F) + V * d
    assert flops_per_token(model, T) == 6 * matmul + 6 * L * T * d


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=subprocess_env(cache),
                          capture_output=True, text=True, timeout=300)


def test_params_command(tmp_path):
    out = _cli("params", str(REPO / "configs" / "base" / "350m.yaml"), cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "341,885,952" in out.stdout and "FLOPs per token" in out.stdout
    assert "hidden_matrix" in out.stdout and "embedding" in out.stdout


def test_unknown_command_and_missing_config_exit_2(tmp_path):
    assert _cli("nonsense", cache=tmp_path).returncode == 2
    out = _cli("config", "show", str(tmp_path / "missing.yaml"), cache=tmp_path)
    assert out.returncode == 2 and "missing.yaml" in out.stderr


def test_bench_reference_runs(tmp_path):
    out = _cli("bench", str(REPO / "configs" / "base" / "tiny.yaml"), "device=cpu", "data.seq_len=32",
               "train.global_batch=4", "train.micro_batch=2", "--steps", "2", "--warmup", "1", "--reference",
               cache=tmp_path)
    assert out.returncode == 0, out.stderr
    assert re.search(r"ratio \(ablate / reference tokens/s\): \d+\.\d+", out.stdout)
