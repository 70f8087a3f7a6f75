"""`ablate coordcheck` on the run's own data: a report with one verdict line per quantity, the
JSON and the PNG plots; bad lists exit 2 naming the flag."""
from __future__ import annotations

import json

import pytest
import yaml

from train.cli import main


def test_coordcheck_command(tiny_dict, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict))
    out = tmp_path / "cc"
    assert main(["coordcheck", str(cfg), "model.param.kind=mup", "model.param.base_width=32", "--widths", "32,64",
                 "--depths", "2,3", "--steps", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "logits_delta vs width:" in text and "residual vs depth:" in text
    result = json.loads((out / "coordcheck.json").read_text())
    assert [r["width"] for r in result["sweeps"]["width"]["rows"]] == [32, 64]
    assert [r["depth"] for r in result["sweeps"]["depth"]["rows"]] == [2, 3]
    pytest.importorskip("matplotlib")
    assert (out / "coordcheck_width.png").stat().st_size > 1000 and (out / "coordcheck_depth.png").exists()


def test_coordcheck_bad_flags_exit_2(tiny_dict, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_dict))
    assert main(["coordcheck", str(cfg), "--widths", "32,x"]) == 2
    assert main(["coordcheck", str(cfg), "--widths", "32", "--depths", ""]) == 2
    assert main(["coordcheck", str(cfg), "--widths", "33,64", "--depths", ""]) == 2      # not a multiple of n_heads
    err = capsys.readouterr().err
    assert "--widths" in err
