"""`init_from` across architecture changes: matching keys load, `init_from_allow_new` /
`init_from_allow_unused` globs admit new and removed parameters, model-declared aliases fill a
parameter from another checkpoint entry, and everything else (and every shape mismatch) stops
the run before its run dir exists, listing each culprit."""
from __future__ import annotations

import pytest
import torch
import yaml
from ablate_testing import make_cfg, train_rows

import models
from models.registry import ConfigError
from train import checkpoint as ckpt
from train.runtime import load_model
from train.trainer import train


def _trained(finished_run) -> dict[str, torch.Tensor]:
    model, _, _ = load_model(finished_run)
    return model.state_dict()


def test_new_parameters_need_allow_new_and_keep_their_fresh_init(finished_run, tmp_path, tiny_dict):
    over = dict(init_from=str(finished_run), train__steps=1, model__ffn__bias=True, checkpoint__every=0)
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, **over), tmp_path / "refused")
    assert e.value.key == "init_from"
    for name in ("blocks.0.ffn.w_in.bias", "blocks.0.ffn.w2.bias", "blocks.1.ffn.w2.bias"):
        assert name in e.value.message               # every missing key is listed
    assert "init_from_allow_new" in e.value.message
    assert not (tmp_path / "refused").exists()       # nothing written

    run = tmp_path / "ok"
    assert train(make_cfg(tiny_dict, **over, init_from_allow_new=["blocks.*.ffn.*.bias"]), run).status == "done"
    [event] = [e for e in train_rows(run, "event") if e["event"] == "init_from"]
    assert sorted(event["new"]) == sorted(f"blocks.{i}.ffn.{w}.bias" for i in (0, 1) for w in ("w_in", "w2"))
    assert event["unused"] == []


def test_removed_modules_need_allow_unused(finished_run, tmp_path, tiny_dict):
    over = dict(init_from=str(finished_run), train__steps=1, model__n_layers=1, checkpoint__every=0)
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, **over), tmp_path / "refused")
    assert "blocks.1.mixer.wq.weight" in e.value.message and "init_from_allow_unused" in e.value.message
    cfg = make_cfg(tiny_dict, **over, init_from_allow_unused=["blocks.1.*"])
    assert train(cfg, tmp_path / "ok").status == "done"
    cfg.model.vocab_size = 384
    model = models.Decoder(cfg.model)
    report = ckpt.init_from_checkpoint(ckpt.latest_checkpoint(finished_run / "checkpoints")[1], model,
                                       allow_unused=["blocks.1.*"])
    assert report["unused"] and all(k.startswith("blocks.1.") for k in report["unused"])
    trained = _trained(finished_run)
    for name, value in model.state_dict().items():
        assert torch.equal(value, trained[name]), name


def test_shape_mismatch_is_always_an_error(finished_run, tmp_path, tiny_dict):
    cfg = make_cfg(tiny_dict, init_from=str(finished_run), train__steps=1, model__d_model=64,
                   init_from_allow_new=["*"], init_from_allow_unused=["*"])
    with pytest.raises(ConfigError) as e:
        train(cfg, tmp_path / "run")
    assert "shape mismatches" in e.value.message and "embed.weight: (384, 64) in the model, (384, 32)" in e.value.message


def test_aliases_fill_a_parameter_the_checkpoint_lacks(finished_run, monkeypatch):
    """LayerNorm removal's v-path norm copies the attention-input norm's gain; an alias never
    overrides an entry the checkpoint has under the model's own name."""
    cfg = yaml.safe_load((finished_run / "config.yaml").read_text())["model"]
    cfg["norm"]["removal"] = {}
    model = models.Decoder(models.model_config(cfg))
    assert model.init_from_aliases() == {f"blocks.{i}.mixer_norm_v.weight": f"blocks.{i}.mixer_norm.weight"
                                         for i in (0, 1)}
    path = ckpt.latest_checkpoint(finished_run / "checkpoints")[1]
    report = ckpt.init_from_checkpoint(path, model, allow_new=model.init_from_fresh(),
                                       aliases=model.init_from_aliases())
    trained = _trained(finished_run)
    for i in (0, 1):
        assert torch.equal(model.blocks[i].mixer_norm_v.weight, trained[f"blocks.{i}.mixer_norm.weight"])
        assert torch.equal(model.blocks[i].mixer_norm.weight, trained[f"blocks.{i}.mixer_norm.weight"])
    assert report["unused"] == [] and sorted(report["new"]) == sorted(model.init_from_fresh())

    plain = models.Decoder(models.model_config(yaml.safe_load((finished_run / "config.yaml").read_text())["model"]))
    monkeypatch.setattr(models.Decoder, "init_from_aliases",
                        lambda self: {"blocks.1.ffn_norm.weight": "blocks.1.mixer_norm.weight"})
    ckpt.init_from_checkpoint(path, plain, aliases=plain.init_from_aliases())
    assert torch.equal(plain.blocks[1].ffn_norm.weight, trained["blocks.1.ffn_norm.weight"])


def test_cli_exits_2_naming_init_from(finished_run, tmp_path, tiny_dict):
    from train.cli import main
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**tiny_dict, "init_from": str(finished_run)}))
    assert main(["train", str(path), "model.n_layers=3", "--run-dir", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError) as e:
        make_cfg(tiny_dict, init_from_allow_new=["x"])
    assert e.value.key == "init_from_allow_new"


def test_dense_run_into_a_memory_model(finished_run, tmp_path, tiny_dict):
    """The memory layer's parameters are new, the dense FFN it replaces goes unused; the rest loads."""
    memory = {"layers": [1], "heads": 2, "k_dim": 16, "n_keys": 8, "knn": 4}
    cfg = make_cfg(tiny_dict, init_from=str(finished_run), train__steps=1, checkpoint__every=0, model__memory=memory,
                   init_from_allow_new=["blocks.1.ffn.*"], init_from_allow_unused=["blocks.1.ffn.*"])
    run = tmp_path / "memory"
    assert train(cfg, run).status == "done"
    [event] = [e for e in train_rows(run, "event") if e["event"] == "init_from"]
    assert "blocks.1.ffn.keys" in event["new"] and "blocks.1.ffn.values.weight" in event["new"]
    assert sorted(event["unused"]) == ["blocks.1.ffn.w2.weight", "blocks.1.ffn.w_in.weight"]
