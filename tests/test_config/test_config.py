"""The run config: YAML `base:` inheritance, dotted overrides, validation errors, resume drift
and the `config show` CLI."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from models.registry import ConfigError
from train.config import Config, apply_overrides, config_drift, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


def raises_key(data: dict, key: str, *, contains: str | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    err = info.value
    assert err.key == key, f"expected key {key!r}, got {err.key!r}: {err}"
    assert key in str(err)
    if contains is not None:
        assert contains in str(err), str(err)
    return err


# ----------------------------------------------------------------------------- defaults
def test_defaults_build_and_round_trip():
    cfg = config_from_dict({})
    assert isinstance(cfg, Config)
    again = config_from_dict(cfg.to_dict())
    assert again == cfg
    # the resolved tree is plain YAML
    text = yaml.safe_dump(cfg.to_dict())
    assert config_from_dict(yaml.safe_load(text)) == cfg


def test_round_trip_with_windowed_mixers(tmp_path):
    f = write(tmp_path / "c.yaml", {"model": {"layers": {"pattern": "AS", "mixers": {
        "A": {"kind": "attention"}, "S": {"kind": "attention", "window": 16}}}}})
    cfg = load_config(f)
    assert cfg.model.layers.mixers["S"].window == 16
    d = cfg.to_dict()
    assert d["model"]["layers"]["mixers"]["S"] == {"kind": "attention", "window": 16, "temperature": False,
                                                   "qk_bias": False, "v_bias": False}
    assert config_from_dict(d) == cfg


# ----------------------------------------------------------------------------- base inheritance
def test_base_deep_merge_relative_child_wins(tmp_path):
    write(tmp_path / "base" / "tiny.yaml", {
        "seed": 1,
        "model": {"d_model": 64, "n_layers": 2, "n_heads": 4, "ffn": {"kind": "mlp", "activation": "gelu"}},
        "optim": {"lr": 1.0e-3, "schedule": {"kind": "wsd", "warmup": 10}},
    })
    child = write(tmp_path / "exp" / "child.yaml", {
        "base": "../base/tiny.yaml",
        "model": {"n_layers": 3, "ffn": {"activation": "relu"}},
        "optim": {"schedule": {"warmup": 5}},
    })
    cfg = load_config(child)
    assert cfg.seed == 1
    assert cfg.model.d_model == 64             # from base
    assert cfg.model.n_heads == 4
    assert cfg.model.n_layers == 3             # child wins
    assert cfg.model.ffn.kind == "mlp"         # deep merge keeps base siblings
    assert cfg.model.ffn.activation == "relu"
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.optim.schedule.kind == "wsd"
    assert cfg.optim.schedule.warmup == 5
    assert cfg.name == "child"
    assert "base" not in cfg.to_dict()


def test_base_relative_to_the_file_not_cwd(tmp_path, monkeypatch):
    write(tmp_path / "a" / "b" / "base.yaml", {"model": {"d_model": 96}})
    child = write(tmp_path / "a" / "b" / "c" / "child.yaml", {"base": "../base.yaml"})
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert load_config(child).model.d_model == 96
    assert load_config(os.path.relpath(child, elsewhere)).model.d_model == 96


def test_base_chain_of_two(tmp_path):
    write(tmp_path / "g.yaml", {"seed": 7, "model": {"d_model": 32, "n_layers": 1, "n_heads": 2},
                                "train": {"steps": 10}})
    write(tmp_path / "sub" / "p.yaml", {"base": "../g.yaml", "model": {"n_layers": 2}, "train": {"steps": 20}})
    child = write(tmp_path / "sub" / "deeper" / "c.yaml", {"base": "../p.yaml", "train": {"steps": 30}})
    cfg = load_config(child)
    assert cfg.seed == 7
    assert cfg.model.d_model == 32
    assert cfg.model.n_layers == 2
    assert cfg.model.n_heads == 2
    assert cfg.train.steps == 30


def test_base_replaces_lists_and_scalars_not_merges(tmp_path):
    write(tmp_path / "b.yaml", {"eval": {"tasks": ["a", "b"]}, "model": {"layers": {"pattern": "AS",
          "mixers": {"A": {"kind": "attention"}, "S": {"kind": "attention", "window": 8}}}}})
    child = write(tmp_path / "c.yaml", {"base": "b.yaml", "eval": {"tasks": ["c"]},
                                        "model": {"layers": {"pattern": "A"}}})
    cfg = load_config(child)
    assert cfg.eval.tasks == ["c"]
    assert cfg.model.layers.pattern == "A"
    assert set(cfg.model.layers.mixers) == {"A", "S"}   # mixers dict deep-merged from base


def test_circular_base_errors(tmp_path):
    write(tmp_path / "a.yaml", {"base": "b.yaml", "seed": 1})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "seed": 2})
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "a.yaml")
    assert info.value.key == "base"
    assert "circular" in str(info.value)


def test_self_base_errors(tmp_path):
    write(tmp_path / "a.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "a.yaml")


def test_missing_base_file_names_the_file(tmp_path):
    child = write(tmp_path / "c.yaml", {"base": "nope.yaml"})
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(child)


def test_invalid_yaml_names_the_file(tmp_path):
    f = write(tmp_path / "bad.yaml", "model:\n  d_model: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(f)


# ----------------------------------------------------------------------------- overrides
def test_overrides_are_yaml_parsed(tmp_path):
    f = write(tmp_path / "c.yaml", {"model": {"d_model": 64, "n_heads": 4}})
    cfg = load_config(f, ["optim.lr=3e-3", "model.tie_embeddings=false", "eval.tasks=[hellaswag, arc_easy]",
                          "model.n_layers=6", "optim.betas=[0.8, 0.99]", "model.n_kv_heads=null",
                          "data.cache_dir=/tmp/x"])
    assert isinstance(cfg.optim.lr, float) and cfg.optim.lr == pytest.approx(3e-3)
    assert cfg.model.tie_embeddings is False
    assert cfg.eval.tasks == ["hellaswag", "arc_easy"]
    assert cfg.model.n_layers == 6 and isinstance(cfg.model.n_layers, int)
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.model.n_kv_heads is None
    assert cfg.data.cache_dir == "/tmp/x"
    assert cfg.model.d_model == 64


def test_overrides_win_over_file_and_base(tmp_path):
    write(tmp_path / "b.yaml", {"model": {"n_layers": 2}})
    f = write(tmp_path / "c.yaml", {"base": "b.yaml", "model": {"n_layers": 3}})
    assert load_config(f, ["model.n_layers=5"]).model.n_layers == 5


def test_apply_overrides_raw_values():
    out = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3.0e-3", "model.tie_embeddings=false",
                                                   "model.layers.pattern=[A, S]", "new.section.key=1"])
    assert out["optim"]["lr"] == 3.0e-3
    assert out["model"]["tie_embeddings"] is False
    assert out["model"]["layers"]["pattern"] == ["A", "S"]
    assert out["new"]["section"]["key"] == 1


def test_apply_overrides_does_not_mutate_input():
    data = {"optim": {"lr": 1.0}}
    apply_overrides(data, ["optim.lr=2.0"])
    assert data == {"optim": {"lr": 1.0}}


def test_override_into_scalar_is_an_error():
    with pytest.raises(ConfigError) as info:
        apply_overrides({"model": {"d_model": 64}}, ["model.d_model.x=3"])
    assert info.value.key == "model.d_model"


@pytest.mark.parametrize("bad", ["model.d_model", "=3", "model..d_model=3"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError):
        apply_overrides({}, [bad])


def test_override_unknown_key_names_it(tmp_path):
    f = write(tmp_path / "c.yaml", {})
    with pytest.raises(ConfigError) as info:
        load_config(f, ["model.d_modle=3"])
    assert info.value.key == "model.d_modle"
    assert "did you mean 'd_model'" in str(info.value)


# ----------------------------------------------------------------------------- validation errors
def test_unknown_key_with_suggestion():
    err = raises_key({"model": {"d_modle": 64}}, "model.d_modle")
    assert "did you mean 'd_model'" in str(err)


def test_unknown_top_level_and_nested_keys():
    raises_key({"modle": {}}, "modle", contains="did you mean 'model'")
    raises_key({"optim": {"schedule": {"warmpu": 3}}}, "optim.schedule.warmpu", contains="warmup")


def test_unknown_key_without_close_match_has_no_suggestion():
    err = raises_key({"train": {"zzzzzz": 1}}, "train.zzzzzz")
    assert "did you mean" not in str(err)


@pytest.mark.parametrize("data,key", [
    ({"model": {"n_layers": "four"}}, "model.n_layers"),
    ({"model": {"n_layers": 4.0}}, "model.n_layers"),
    ({"model": {"n_layers": True}}, "model.n_layers"),
    ({"model": {"tie_embeddings": "yes please"}}, "model.tie_embeddings"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"betas": [0.9]}}, "optim.betas"),
    ({"model": {"ffn": 3}}, "model.ffn"),
    ({"eval": {"tasks": "hellaswag"}}, "eval.tasks"),
    ({"device": "tpu"}, "device"),
    ({"model": {"n_kv_heads": "two"}}, "model.n_kv_heads"),
])
def test_wrong_type(data, key):
    raises_key(data, key)


@pytest.mark.parametrize("data,key", [
    ({"optim": {"lr": -1}}, "optim.lr"),
    ({"optim": {"lr": 0}}, "optim.lr"),
    ({"model": {"norm": {"eps": 0}}}, "model.norm.eps"),
    ({"model": {"d_model": 0}}, "model.d_model"),
    ({"model": {"n_layers": 0}}, "model.n_layers"),
    ({"model": {"init_std": -0.1}}, "model.init_std"),
    ({"optim": {"betas": [0.9, 1.0]}}, "optim.betas[1]"),
    ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay"),
    ({"optim": {"schedule": {"min_lr_ratio": 2.0}}}, "optim.schedule.min_lr_ratio"),
    ({"train": {"steps": 0}}, "train.steps"),
    ({"data": {"seq_len": 1}}, "data.seq_len"),
    ({"checkpoint": {"keep_last": 0}}, "checkpoint.keep_last"),
    ({"model": {"layers": {"mixers": {"A": {"kind": "attention", "window": 0}}}}},
     "model.layers.mixers.A.window"),
])
def test_out_of_range(data, key):
    raises_key(data, key)


def test_yaml_style_float_without_dot_is_accepted(tmp_path):
    # PyYAML reads `1e-3` (no dot) as a string; the schema accepts it as a number
    f = write(tmp_path / "c.yaml", "optim:\n  lr: 1e-3\nmodel:\n  norm:\n    eps: 1e-5\n")
    cfg = load_config(f)
    assert cfg.optim.lr == pytest.approx(1e-3)
    assert cfg.model.norm.eps == pytest.approx(1e-5)


def test_heads_must_divide_width():
    raises_key({"model": {"d_model": 64, "n_heads": 5}}, "model.n_heads", contains="does not divide")


def test_kv_heads_must_divide_heads():
    raises_key({"model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads",
               contains="does not divide")


def test_odd_head_dim_rejected_for_rope():
    raises_key({"model": {"d_model": 36, "n_heads": 4}}, "model.n_heads")


def test_pattern_letter_without_mixer():
    err = raises_key({"model": {"layers": {"pattern": "AX"}}}, "model.layers.pattern")
    assert "'X'" in str(err)


def test_list_pattern_length_must_match_layers():
    raises_key({"model": {"n_layers": 4, "layers": {"pattern": ["A", "A", "A"]}}}, "model.layers.pattern")


def test_memory_layer_index_out_of_range():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"n_layers": 4, "memory": {"layers": [5]}}})
    key = info.value.key
    assert key.startswith("model.memory.layers"), key
    assert "5" in str(info.value)
    with pytest.raises(ConfigError) as info:
        config_from_dict({"model": {"n_layers": 4, "memory": {"layers": [-1]}}})
    assert info.value.key.startswith("model.memory.layers")


def test_unknown_mixer_kind_with_suggestion():
    err = raises_key({"model": {"layers": {"mixers": {"A": {"kind": "attenton"}}}}},
                     "model.layers.mixers.A.kind")
    assert "did you mean 'attention'" in str(err)


def test_unknown_mixer_key():
    raises_key({"model": {"layers": {"mixers": {"A": {"kind": "attention", "windw": 8}}}}},
               "model.layers.mixers.A.windw", contains="did you mean 'window'")


def test_mixer_without_kind():
    raises_key({"model": {"layers": {"mixers": {"A": {"window": 8}}}}}, "model.layers.mixers.A.kind")


def test_unknown_activation():
    err = raises_key({"model": {"ffn": {"kind": "glu", "activation": "swiglue"}}}, "model.ffn.activation")
    assert "did you mean 'swiglu'" in str(err)
    raises_key({"model": {"ffn": {"kind": "mlp", "activation": "rleu"}}}, "model.ffn.activation",
               contains="did you mean 'relu'")


def test_glu_variant_on_mlp_is_rejected():
    raises_key({"model": {"ffn": {"kind": "mlp", "activation": "swiglu"}}}, "model.ffn.activation")


def test_unknown_ffn_kind_and_norm():
    raises_key({"model": {"ffn": {"kind": "gluu"}}}, "model.ffn.kind", contains="did you mean 'glu'")
    raises_key({"model": {"norm": {"block": "rmsnrom"}}}, "model.norm.block", contains="did you mean 'rmsnorm'")
    raises_key({"model": {"norm": {"final": "bogus"}}}, "model.norm.final")
    raises_key({"model": {"param": {"kind": "bogus"}}}, "model.param.kind")


def test_global_batch_multiple_of_micro_batch():
    raises_key({"train": {"global_batch": 10, "micro_batch": 4}}, "train.global_batch", contains="multiple")
    config_from_dict({"train": {"global_batch": 12, "micro_batch": 4}})


def test_seq_len_not_above_max_seq_len():
    raises_key({"model": {"max_seq_len": 128}, "data": {"seq_len": 256}}, "data.seq_len")
    config_from_dict({"model": {"max_seq_len": 256}, "data": {"seq_len": 256}})


def test_errors_from_files_carry_the_dotted_key(tmp_path):
    write(tmp_path / "b.yaml", {"model": {"n_layers": 4}})
    f = write(tmp_path / "c.yaml", {"base": "b.yaml", "model": {"memory": {"layers": [5]}}})
    with pytest.raises(ConfigError) as info:
        load_config(f)
    assert info.value.key.startswith("model.memory.layers")


# ----------------------------------------------------------------------------- drift
def test_config_drift_lists_non_resumable_keys():
    saved = config_from_dict({}).to_dict()
    current = config_from_dict({"model": {"d_model": 128}, "optim": {"lr": 1e-3},
                                "train": {"steps": 999}, "checkpoint": {"every": 7},
                                "eval": {"every": 3, "tasks": ["x"]}}).to_dict()
    drift = config_drift(saved, current)
    keys = sorted(d.split(":")[0] for d in drift)
    assert keys == ["model.d_model", "optim.lr"], drift
    assert any("256" in d and "128" in d for d in drift)


def test_config_drift_ignores_resumable_keys_only():
    saved = config_from_dict({}).to_dict()
    current = config_from_dict({"train": {"steps": 5000}, "checkpoint": {"every": 100, "keep_last": 5},
                                "eval": {"every": 50, "tasks": ["hellaswag"], "limit": 10}}).to_dict()
    assert config_drift(saved, current) == []
    assert config_drift(saved, saved) == []


def test_config_drift_seed_and_data_seed_matter():
    saved = config_from_dict({}).to_dict()
    current = config_from_dict({"seed": 1, "data": {"seed": 2}, "train": {"global_batch": 16}}).to_dict()
    keys = sorted(d.split(":")[0] for d in config_drift(saved, current))
    assert keys == ["data.seed", "seed", "train.global_batch"]


def test_config_drift_added_or_removed_keys():
    drift = config_drift({"model": {"d_model": 64}}, {"model": {"d_model": 64, "qk_norm": True}})
    assert len(drift) == 1 and drift[0].startswith("model.qk_norm")


# ----------------------------------------------------------------------------- CLI
def _cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_config_show_bad_key_exits_2(tmp_path):
    f = write(tmp_path / "c.yaml", {"model": {"d_model": 64}})
    proc = _cli("config", "show", str(f), "model.d_modle=3", cwd=tmp_path)
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "model.d_modle" in proc.stderr


def test_cli_config_show_prints_resolved_yaml(tmp_path):
    write(tmp_path / "base.yaml", {"model": {"d_model": 64, "n_heads": 4}})
    f = write(tmp_path / "c.yaml", {"base": "base.yaml", "model": {"n_layers": 3}})
    proc = _cli("config", "show", str(f), "optim.lr=2e-3", cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    shown = yaml.safe_load(proc.stdout)
    assert shown["model"]["d_model"] == 64
    assert shown["model"]["n_layers"] == 3
    assert shown["optim"]["lr"] == pytest.approx(2e-3)
    assert "base" not in shown
