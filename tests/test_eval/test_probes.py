"""The probe registry and `ablate probe` (sparsity, layer linearity) on one tiny trained run,
and the linearity score's algebra against a direct least-squares fit."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from ablate_testing import TINY, make_cfg

from eval.probes import PROBES, run_probes, select
from eval.probes.linearity import _Moments, layer_linearity
from train.cli import main


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    """12 steps of the TINY config (checkpoints at 4, 8, 12)."""
    from train.trainer import train
    root = tmp_path_factory.mktemp("probe_run")
    d = copy.deepcopy(TINY)
    d["data"]["cache_dir"] = str(root / "cache")
    run_dir = root / "run"
    assert train(make_cfg(d), run_dir).status == "done"
    return run_dir


@pytest.fixture(scope="module")
def model_and_batches(probe_run):
    from train.data import fixed_batches, prepare_data
    from train.runtime import load_model
    model, cfg, _ = load_model(probe_run, "latest")
    data = prepare_data(cfg, progress=False)
    return model, cfg, fixed_batches(data.val_samples(cfg.data.seq_len), cfg.train.micro_batch, 8)   # 1,024 tokens


def _direct(x: torch.Tensor, y: torch.Tensor) -> float:
    """The paper's score computed literally: centre, Frobenius-normalise, least squares, 1 - error."""
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    x, y = x / x.norm(), y / y.norm()
    a = torch.linalg.lstsq(x, y).solution
    return float(1 - (x @ a - y).square().sum())


def test_linearity_score_matches_a_direct_fit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) * 3 + 1
    w = torch.randn(8, 8, generator=g)
    y = x + torch.tanh(x @ w) + 0.1 * torch.randn(400, 8, generator=g)
    m = _Moments(8, torch.device("cpu"))
    for i in range(0, 400, 128):                          # accumulated over batches
        m.add(x[i:i + 128], y[i:i + 128])
    with_res, no_res = m.scores()
    assert with_res == pytest.approx(_direct(x, y), abs=1e-9)
    assert no_res == pytest.approx(_direct(x, y - x), abs=1e-9)
    assert no_res < with_res < 1

    lin = _Moments(8, torch.device("cpu"))
    lin.add(x, x @ w + 2)                                 # an affine map: exactly linear
    assert lin.scores()[0] == pytest.approx(1.0, abs=1e-9)
    ident = _Moments(8, torch.device("cpu"))
    ident.add(x, x)                                       # identity: no update to explain
    assert ident.scores() == (pytest.approx(1.0, abs=1e-9), None)
    few = _Moments(8, torch.device("cpu"))
    few.add(x[:9], y[:9])                                 # N <= d + 1: any map fits, no score
    assert few.scores() == (None, None)


def test_linearity_of_identity_like_and_random_models(model_and_batches):
    import models
    model, cfg, batches = model_and_batches
    trained = layer_linearity(model, batches)
    assert len(trained["linearity"]) == cfg.model.n_layers
    ident = copy.deepcopy(model)
    with torch.no_grad():                                 # every block's branches shrunk: h_{l+1} ~ h_l
        for block in ident.blocks:
            for p in [*block.mixer.parameters(), *block.ffn.parameters()]:
                p.mul_(0.1)
    near = layer_linearity(ident, batches)["linearity"]
    assert all(v > 0.999 for v in near), near
    rcfg = copy.deepcopy(cfg.model)
    rcfg.init_std = 1.0                                   # random weights whose branches dominate the stream
    rand = layer_linearity(models.Decoder(rcfg, init_seed=1).eval(), batches)["linearity"]
    assert sum(rand) / len(rand) < 0.9 and all(r < n for r, n in zip(rand, near)), (rand, near)
    assert model.training is False                        # the mode is restored


def test_registry_selects_probes_that_apply(model_and_batches):
    model, _, _ = model_and_batches
    assert {"sparsity", "linearity"} <= set(PROBES)
    chosen, skipped = select(None, model)
    assert [p.name for p in chosen] == list(PROBES) and skipped == {}
    from models.registry import ConfigError
    with pytest.raises(ConfigError, match="--probes.*unknown probe 'nowhere'"):
        select(["nowhere"], model)


def test_probe_command_writes_json_and_plots(probe_run, capsys):
    assert main(["probe", str(probe_run), "--step", "8", "--probes", "linearity,sparsity"]) == 0
    out = capsys.readouterr().out
    assert "linearity_no_residual" in out and "sparsity" in out and "mean" in out
    d = probe_run / "probes" / "step-00000008"
    data = json.loads((d / "probes.json").read_text())
    assert data["step"] == 8 and set(data["probes"]) == {"sparsity", "linearity", "linearity_no_residual"}
    assert len(data["probes"]["linearity"]["layers"]) == 2 and data["probes"]["linearity"]["probe"] == "linearity"
    for name in ("linearity.png", "sparsity.png"):
        assert (d / name).read_bytes()[:4] == b"\x89PNG"
    assert main(["probe", str(probe_run), "--probes", "nope"]) == 2
    assert "--probes" in capsys.readouterr().err

    # compare reads the file (the newest at or before the point)
    from eval.compare.report import build
    (arm,) = build([probe_run]).data["arms"].values()
    assert arm["probes"]["linearity"]["layers"][0]["mean"] == pytest.approx(data["probes"]["linearity"]["layers"][0])


def test_run_probes_default_is_every_probe(probe_run):
    report = run_probes(probe_run, "latest", n_batches=1)
    assert report["step"] == 12 and report["tokens"] == TINY["train"]["micro_batch"] * TINY["data"]["seq_len"]
    assert {"sparsity", "linearity", "linearity_no_residual", "entropy", "entropy_max"} == set(report["probes"])
