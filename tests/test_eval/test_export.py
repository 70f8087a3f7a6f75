"""`ablate export-hf` (train/export.py, models/hf.py): every architecture option exports, and the
export loads with `AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)` in a
process where this repo cannot be imported.

One module fixture writes every export and what our own code computes for it, then runs ONE
subprocess (tests/hf_export_check.py, cwd outside the repo, the repo hidden from imports) for all
the Hugging Face side checks; the tests below read its report:

- per option, enumerated from the registries (mixers, FFN kinds x activations, norms, memory
  layers, parameterizations) and the config sections' bool / Literal fields, random init:
  logits equal ours (1e-5, fp32), left-padded batched logits equal the unpadded rows, and greedy
  `generate` on the left-padded batch equals our decode per row;
- the trained tiny run: greedy `generate` equals `ablate generate`; lm-eval's own `hf` backend
  gives the per-item log-likelihoods and scores of `ablate eval` on `ablate_val_ppl` (limit 20);
  `--format llama` loads with plain transformers (no remote code) and gives our logits.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from ablate_testing import REPO

from models.config import FFNConfig, MemoryConfig, ModelConfig, ParamConfig, StochasticConfig
from models.ffn import GLU_GATES
from models.registry import ACTIVATIONS, FFNS, MEMORIES, MIXERS, NORMS, PARAMETERIZATIONS, ConfigError

BASE = {"d_model": 32, "n_layers": 2, "n_heads": 2, "vocab_size": 96, "max_seq_len": 64}
MEMORY = {"layers": [1], "heads": 2, "k_dim": 8, "n_keys": 8, "knn": 2}
PROMPT, PROMPTS, NEW_TOKENS, LIMIT = "The cat", ["The cat sat on", "A"], 12, 20


def _literals(cls: type, name: str) -> tuple:
    return typing.get_args(typing.get_type_hints(cls)[name])


def variants(cls: type) -> list[tuple[str, object]]:
    """(field, value) for every non-default value of a config dataclass's bool and Literal
    (or Literal | None) fields: the switches and choices a technique adds to its section."""
    hints, default, out = typing.get_type_hints(cls), cls(), []
    for f in dataclasses.fields(cls):
        hint, current = hints[f.name], getattr(default, f.name)
        if hint is bool:
            out.append((f.name, not current))
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Literal:
            values = typing.get_args(hint)
        elif len(args) == 1 and typing.get_origin(args[0]) is typing.Literal:
            values = typing.get_args(args[0])
        else:
            continue
        out += [(f.name, v) for v in values if v != current]
    return out


def options() -> dict[str, dict]:
    """name -> {"model": overrides of BASE, "schedule": module attributes to set}: every option the
    registries and the config sections' switches and choices offer, so a new one is picked up
    without editing this. A variant this machine refuses (fla's kernel without CUDA) is left out."""
    import models
    opts: dict[str, dict] = {}

    def add(name: str, model: dict, **schedule) -> None:
        try:
            models.model_config({**copy.deepcopy(BASE), **copy.deepcopy(model)})
        except ConfigError:
            return
        opts[name] = {"model": model, "schedule": schedule}

    for kind in MIXERS.names():
        mixer = {"kind": kind}
        add(f"mixer={kind}", {"layers": {"pattern": "X", "mixers": {"X": mixer}}})
        if kind != "attention":
            add(f"mixers=attention+{kind}", {"layers": {"pattern": "AX", "mixers": {"A": {"kind": "attention"},
                                                                                     "X": mixer}}})
        for key, value in variants(MIXERS.config_class(kind)):
            add(f"mixer={kind}.{key}={value}", {"layers": {"pattern": "X", "mixers": {"X": {**mixer, key: value}}}})
    add("attention.window=3", {"layers": {"mixers": {"A": {"kind": "attention", "window": 3}}}})
    add("gqa", {"n_heads": 4, "n_kv_heads": 2})
    add("rope_theta=500", {"rope_theta": 500.0})
    for key, value in variants(ModelConfig):
        add(f"model.{key}={value}", {key: value})
    for kind in FFNS.names():
        for act in sorted(set(ACTIVATIONS.names()) | set(GLU_GATES)):
            try:
                FFNS.get(kind).check_activation(act, "activation")
            except ConfigError:
                continue
            add(f"ffn={kind}/{act}", {"ffn": {"kind": kind, "activation": act}})
    for key, value in variants(FFNConfig):
        add(f"ffn.{key}={value}", {"ffn": {key: value}})
    for mode in _literals(StochasticConfig, "eval_mode"):
        for granularity in _literals(StochasticConfig, "granularity"):
            add(f"stochastic eval_mode={mode} granularity={granularity}",
                {"ffn": {"kind": "mlp", "activation": "stochastic",
                         "stochastic": {"p": 0.5, "eval_mode": mode, "granularity": granularity}}}, train_step=5)
    add("ffn=glu/swiglu relu_finetune", {}, relu_finetune=True)
    for norm in NORMS.names():
        add(f"norm={norm}", {"norm": {"block": norm, "final": norm}})
    for kind in MEMORIES.names():
        add(f"memory={kind}", {"memory": {**MEMORY, "kind": kind}})
        for key, value in variants(MemoryConfig):
            add(f"memory={kind}.{key}={value}", {"memory": {**MEMORY, "kind": kind, key: value}})
    for kind in PARAMETERIZATIONS.names():
        param = {"kind": kind, "base_width": 16, "base_depth": 1,
                 **({} if kind == "sp" else {"input_mult": 2.0, "output_mult": 0.5})}
        add(f"param={kind}", {"param": param})
        for key, value in variants(ParamConfig):
            add(f"param={kind}.{key}={value}", {"param": {**param, key: value}})
    add("head_bias", {"head_bias": True, "tie_embeddings": False})     # refused with the tied default
    for norm in ("rmsnorm", "layernorm"):        # LayerNorm removal mid-schedule: some norms fake, with the
        # EOT / position-0 stds still apart (the buffers travel in the weights)
        add(f"norm.removal {norm} mid-schedule", {"norm": {"block": norm, "final": norm, "removal": {"eot_token": 5}}},
            norm_removal=True)
    if "entropy_reg" in {f.name for f in dataclasses.fields(ModelConfig)}:
        add("entropy_reg fixed threshold", {"entropy_reg": {"weight": 0.1, "learn_threshold": False}})
    return opts


def build(option: dict, seed: int):
    import models
    model = models.Decoder(models.model_config({**BASE, **option["model"]}), init_seed=seed).eval()
    if option["schedule"].get("norm_removal"):
        from models.norm_removal import BOS, RemovableNorm
        norms = [m for m in model.modules() if isinstance(m, RemovableNorm)]
        for i, norm in enumerate(norms[::2]):       # every other norm fake, stds (0.5 + i/4, 2, 3)
            norm.freeze(torch.tensor([[0.5 + i / 4, 2.0, 3.0], [1.0, 1.0, 1.0]], dtype=torch.float64))
        norms[0].end_special(BOS)
    for m in model.modules():
        if option["schedule"].get("relu_finetune") and hasattr(m, "relu_finetune"):
            m.relu_finetune = True
        if "train_step" in option["schedule"] and hasattr(m, "set_train_step"):
            m.set_train_step(option["schedule"]["train_step"])
    return model


@torch.no_grad()
def expected(model, seed: int) -> dict:
    """Our logits on a batch, each prompt's logits alone and its greedy continuation."""
    from train.generate import generate
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, model.cfg.vocab_size, (2, 12), generator=g)
    prompts = [ids[0, :9].clone(), ids[1, :5].clone()]
    return {"ids": ids, "logits": model(ids).logits, "prompts": prompts,
            "row_logits": [model(p[None]).logits[0] for p in prompts],
            "greedy": [generate(model, p[None], 6)[0, len(p):] for p in prompts]}


@pytest.fixture(scope="module")
def run(trained_run, tmp_path_factory) -> Path:
    """A private copy of the shared trained run (this module writes exports and eval results)."""
    dst = tmp_path_factory.mktemp("export_run") / "run"
    shutil.copytree(trained_run, dst, ignore=shutil.ignore_patterns("eval", "hf"))
    return dst


@pytest.fixture(scope="module")
def checked(run, tmp_path_factory) -> dict:
    """Write every export and our side of every check, run the one subprocess, return its report
    together with our side."""
    from eval.adapter import AblateLM
    from eval.local import val_docs_path
    from eval.runner import EvalSpec, evaluate_run
    from lm_eval.api.instance import Instance
    from train.data import load_tokenizer
    from train.export import bundle_sources, export_run, write_ablate_folder, write_llama_folder
    from train.generate import generate_from_run
    from train.rundir import RunDir
    from train.runtime import load_model

    root = tmp_path_factory.mktemp("exports")
    bundle = bundle_sources()                    # regenerated from the current sources, once
    spec_options = []
    for i, (name, option) in enumerate(sorted(options().items())):
        model = build(option, seed=i)
        folder = root / f"opt{i:03d}" / "hf"     # one basename: transformers imports the bundle once
        folder.mkdir(parents=True)
        write_ablate_folder(model, folder, bundle=bundle)
        torch.save(expected(model, i), folder.parent / "expected.pt")
        spec_options.append([name, str(folder), str(folder.parent / "expected.pt")])

    # the trained run: ablate's own generate and eval, the exports in both formats
    ours: dict = {"generate": generate_from_run(run, PROMPT, max_new_tokens=NEW_TOKENS)}
    [res] = evaluate_run(run, "latest", EvalSpec(["ablate_val_ppl"], limit=LIMIT, bootstrap_iters=0))
    ours["metrics"] = {k: v["value"] for k, v in res["metrics"]["ablate_val_ppl"].items()}
    docs = [json.loads(line)["text"] for line in val_docs_path(RunDir(run)).read_text().splitlines()][:LIMIT]
    model, _, _ = load_model(run, "latest")
    tok = load_tokenizer(run / "tokenizer")
    ours["loglikelihoods"] = AblateLM(model, tok).loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(docs)])
    ours["export"] = export_run(run)
    ours["llama_export"] = export_run(run, fmt="llama")
    torch.save(expected(model, 0), root / "run_expected.pt")
    gqa = build({"model": {"n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 500.0,
                           "norm": {"eps": 1e-5}}, "schedule": {}}, seed=7)
    (root / "llama_gqa").mkdir()
    write_llama_folder(gqa, root / "llama_gqa")
    torch.save(expected(gqa, 7), root / "llama_gqa_expected.pt")

    spec = {"repo": str(REPO), "options": spec_options,
            "run": {"export": str(ours["export"]), "prompt": PROMPT, "prompts": PROMPTS, "max_new_tokens": NEW_TOKENS,
                    "task": "ablate_val_ppl", "task_dir": str(REPO / "eval" / "tasks"), "limit": LIMIT,
                    "val_docs": str(val_docs_path(RunDir(run)).resolve()), "batch_size": 16,
                    "llama": {"run": [str(ours["llama_export"]), str(root / "run_expected.pt")],
                              "gqa_untied": [str(root / "llama_gqa"), str(root / "llama_gqa_expected.pt")]}}}
    (root / "spec.json").write_text(json.dumps(spec))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HF_MODULES_CACHE=str(root / "hf_modules"))
    work = tmp_path_factory.mktemp("outside_repo")
    assert not work.resolve().is_relative_to(REPO)
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "hf_export_check.py"), str(root / "spec.json"),
                           str(root / "report.json")], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((root / "report.json").read_text())
    return {"report": report, "ours": ours, "names": [o[0] for o in spec_options]}


def test_repo_is_not_importable_in_the_checking_process(checked):
    assert checked["report"]["models_importable"] is False


def test_options_cover_the_registries(checked):
    names = checked["names"]
    for kind in MIXERS.names():
        assert f"mixer={kind}" in names
    assert set(FFNS.names()) == {n[len("ffn="):].split("/")[0] for n in names if n.startswith("ffn=")}
    for reg, prefix in ((NORMS, "norm="), (MEMORIES, "memory="), (PARAMETERIZATIONS, "param=")):
        assert set(reg.names()) <= {n[len(prefix):] for n in names if n.startswith(prefix)}
    assert set(ACTIVATIONS.names()) <= {n.split("/")[1] for n in names if n.startswith("ffn=")}


def test_every_option_exports_with_our_logits(checked):
    report = checked["report"]["options"]
    failed = {name: r.get("error", r) for name, r in report.items()
              if "error" in r or not r["class"].startswith("transformers_modules.") or r["logits"] > 1e-5}
    assert not failed, failed


def test_left_padded_batches_equal_unpadded_rows(checked):
    report = checked["report"]["options"]
    failed = {name: r.get("padded") for name, r in report.items() if "error" in r or r["padded"] > 1e-5}
    assert not failed, failed


def test_greedy_generate_on_left_padded_batches_equals_our_decoding(checked):
    report = checked["report"]["options"]
    failed = [name for name, r in report.items() if "error" in r or not all(r["greedy"])]
    assert not failed, failed


def test_generate_equals_ablate_generate(checked):
    run = checked["report"]["run"]
    assert "error" not in run, run.get("error")
    assert run["generate"] == checked["ours"]["generate"]
    assert run["generate_batch"] == run["generate_rows"]          # left-padded batch == each prompt alone


def test_lm_eval_hf_backend_equals_ablate_eval(checked):
    run, ours = checked["report"]["run"], checked["ours"]
    assert "error" not in run, run.get("error")
    assert 0 < len(ours["loglikelihoods"]) <= LIMIT       # the tiny run has fewer validation documents
    assert run["hflm_loglikelihoods"] == pytest.approx(ours["loglikelihoods"], rel=1e-5, abs=1e-5)
    assert run["hflm_metrics"].keys() == ours["metrics"].keys()
    for k, v in ours["metrics"].items():
        assert run["hflm_metrics"][k] == pytest.approx(v, rel=1e-5), k


def test_llama_format_loads_with_plain_transformers(checked):
    run = checked["report"]["run"]
    assert "error" not in run, run.get("error")
    for name, r in run["llama"].items():
        assert r["class"] == "LlamaForCausalLM", name
        assert r["logits"] < 1e-5, (name, r["logits"])


def test_export_folder_contents(checked):
    out = checked["ours"]["export"]
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "README.md", "ablate_export.json",
            "modeling_ablate.py", "configuration_ablate.py", "tokenizer.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]      # no temp leftovers
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "ablate" and config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_ablate")
    card = (out / "README.md").read_text()
    assert "step 16" in card and "validation loss at step 16" in card and "d_model: 32" in card
    from safetensors import safe_open
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "model.embed.weight" in keys and not any("head" in k for k in keys)     # tied: saved once
    for f in out.glob("*.py"):
        assert not re.search(r"^\s*(from|import) models\b", f.read_text(), re.MULTILINE), f.name


def test_import_models_stays_torch_only():
    code = "import sys, models; print(sorted(m for m in ('transformers', 'lm_eval') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


def test_pad_mask_is_refused_by_a_mixer_that_cannot_take_it():
    model = build({"model": {"layers": {"pattern": "X", "mixers": {"X": {"kind": "deltanet"}}}}, "schedule": {}}, 0)
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="DeltaNet"):
        model(ids, pad_mask=torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- bad input
def test_no_complete_checkpoint_for_the_step(run):
    from train.export import export_run
    with pytest.raises(ConfigError) as e:
        export_run(run, step=999)
    assert e.value.key == "--step" and "999" in str(e.value)


def test_out_dir_that_is_not_an_export_is_refused_unless_force(run, tmp_path):
    from train.export import export_run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError) as e:
        export_run(run, out=out)
    assert e.value.key == "--out" and (out / "notes.txt").read_text() == "keep me"
    assert export_run(run, out=out, force=True) == out
    assert not (out / "notes.txt").exists() and (out / "ablate_export.json").is_file()
    export_run(run, out=out)                    # an earlier export is replaced without --force


def test_failed_export_leaves_nothing(run, tmp_path, monkeypatch):
    from train import export
    out = tmp_path / "hf"

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_bundle", boom)
    with pytest.raises(OSError):
        export.export_run(run, out=out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("overrides, culprit", [
    ({"qk_norm": True}, "model.qk_norm"),
    ({"norm": {"block": "layernorm", "final": "layernorm"}}, "model.norm.block"),
    ({"ffn": {"kind": "mlp", "activation": "gelu"}}, "model.ffn.kind/activation"),
    ({"param": {"kind": "mup", "base_width": 16}}, "model.param.kind"),
    ({"layers": {"mixers": {"A": {"kind": "attention", "window": 4}}}}, "model.layers.mixers.A.window"),
    ({"memory": MEMORY}, "model.memory.layers"),
])
def test_llama_format_names_what_is_not_llama(overrides, culprit):
    from train.export import llama_checkpoint
    with pytest.raises(ConfigError) as e:
        llama_checkpoint(build({"model": overrides, "schedule": {}}, seed=0))
    assert e.value.key == "--format" and culprit in e.value.message


def test_cli_exit_codes(run, tmp_path, capsys):
    from train.cli import main
    assert main(["export-hf", str(run), "--step", "999"]) == 2
    assert main(["export-hf", str(tmp_path), "--out", str(tmp_path / "x")]) == 2       # not a run
    assert main(["export-hf", str(run), "--out", str(tmp_path / "ok")]) == 0
    assert "ok" in capsys.readouterr().out
