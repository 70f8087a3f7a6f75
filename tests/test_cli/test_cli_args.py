"""Command-line parsing: KEY=VALUE overrides anywhere, `ablate params` arms with shared
overrides, `ablate generate --device`."""
from __future__ import annotations

import pytest
import torch
from ablate_testing import REPO

from train import cli

FFN = REPO / "configs" / "ablations" / "ffn"
TINY = str(REPO / "configs" / "base" / "tiny.yaml")


def _parse(*argv: str):
    parser = cli.build_parser()
    return parser.parse_args(cli.gather_overrides(parser, list(argv)))


def test_overrides_after_options_are_overrides():
    args = _parse("train", "c.yaml", "--run-dir", "runs/x", "optim.lr=1e-3")
    assert (args.config, args.run_dir, args.overrides) == ("c.yaml", "runs/x", ["optim.lr=1e-3"])
    args = _parse("train", "--resume", "model.d_model=64", "c.yaml", "--run-dir=runs/y",
                  "model.layers.mixers.A.window=8")
    assert (args.config, args.run_dir, args.resume) == ("c.yaml", "runs/y", True)
    assert args.overrides == ["model.d_model=64", "model.layers.mixers.A.window=8"]


def test_an_option_value_that_looks_like_an_override_stays_the_value():
    args = _parse("coordcheck", "c.yaml", "--out", "a=b", "optim.lr=1", "--steps", "3")
    assert (args.out, args.steps, args.overrides) == ("a=b", 3, ["optim.lr=1"])
    args = _parse("train", "c.yaml", "--run", "x=y", "seed=1")            # an abbreviated option
    assert (args.run_dir, args.overrides) == ("x=y", ["seed=1"])
    args = _parse("generate", "runs/x", "--prompt", "a=b", "--device", "cpu")
    assert (args.run_dir, args.prompt, args.device) == ("runs/x", "a=b", "cpu")
    assert _parse("generate", "runs/x", "--prompt", "p").device is None


@pytest.mark.parametrize("command, options", [
    (["train"], ["--resume"]), (["config", "show"], []), (["data", "prepare"], []), (["data", "bench"], []),
    (["params"], []), (["bench"], ["--steps", "2", "--mixers"]), (["coordcheck"], ["--widths", "8,16"]),
])
def test_every_config_command_takes_overrides_anywhere(command, options):
    args = _parse(*command, "seed=3", *options, "c.yaml", "optim.lr=2")
    assert (args.config, args.overrides) == ("c.yaml", ["seed=3", "optim.lr=2"])


def test_overrides_reach_the_command(monkeypatch):
    seen = {}
    monkeypatch.setattr(cli, "cmd_train", lambda args: seen.update(vars(args)) or 0)
    assert cli.main(["train", "c.yaml", "--run-dir", "d", "optim.lr=1e-3"]) == 0
    assert (seen["run_dir"], seen["overrides"]) == ("d", ["optim.lr=1e-3"])
    assert cli.train_main(["c.yaml", "--resume", "seed=2"]) == 0             # python -m train
    assert (seen["resume"], seen["overrides"]) == (True, ["seed=2"])


def test_a_command_line_with_double_dash_is_left_to_argparse():
    parser = cli.build_parser()
    argv = ["train", "c.yaml", "--run-dir", "d", "--", "x=1"]
    assert cli.gather_overrides(parser, argv) == argv


def test_params_arms_side_by_side_with_shared_overrides(capsys):
    assert cli.main(["params", str(FFN / "swiglu.yaml"), "model.d_model=64", str(FFN / "relu.yaml"),
                     "model.n_heads=2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["arm", "ffn", "hidden", "total", "non-embedding", "vs", "first"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"swiglu", "relu"}
    assert rows["swiglu"][2] == "192" and rows["relu"][2] == "256"     # d_model=64 in both arms
    assert rows["swiglu"][-1] == "+0.000%"


def test_params_single_config_with_overrides(capsys):
    assert cli.main(["params", TINY, "model.n_layers=3"]) == 0
    out = capsys.readouterr().out
    assert "n_layers=3" in out and "optimizer groups" in out
    assert cli.main(["params", TINY, "model.n_layers"]) == 2            # neither a yaml arm nor KEY=VALUE
    assert "model.n_layers" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_generate_device_cuda_without_a_gpu_names_the_flag(tmp_path, capsys):
    assert cli.main(["generate", str(tmp_path), "--prompt", "x", "--device", "cuda"]) == 2
    assert "--device" in capsys.readouterr().err


def test_generate_device_flag_and_default(tmp_path, capsys, monkeypatch):
    assert cli.main(["generate", str(tmp_path), "--prompt", "x", "--device", "gpu"]) == 2     # not a choice
    assert "--device" in capsys.readouterr().err
    assert cli.main(["generate", str(tmp_path), "--prompt", "x"]) == 2         # default: the run's config
    assert "RUN_DIR" in capsys.readouterr().err
    seen = {}
    import train.generate
    monkeypatch.setattr(train.generate, "generate_from_run", lambda *a, **kw: seen.update(kw) or "text")
    assert cli.main(["generate", "runs/x", "--prompt", "p", "--device", "cpu"]) == 0
    assert seen["device"] == "cpu"
