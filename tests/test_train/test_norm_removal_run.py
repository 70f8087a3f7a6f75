"""LayerNorm removal by fine-tuning through the trainer (train/callbacks/norm_removal.py) and
`ablate checkpoint fold-norms` (train/fold.py).

One module fixture fine-tunes the session's finished normed run with a compressed schedule (one
step apart: FFN norms at steps 1-2, q/k 3-4, v 5-6, final 7, EOT 8, position 0 at 9, of 10),
once straight through and once stopped after step 5 (between the two v-path switches) and
resumed. The schedule flips exactly the scheduled norms at the scheduled steps in both; the
resumed run has the same losses and frozen stds; the folded run has no norm modules and the same
logits, and `init_from`, `generate` and a refusal for an unfinished checkpoint work on it."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ablate_testing import make_cfg, train_rows

import models
from models.norm_removal import RemovableNorm, removal_schedule
from models.registry import ConfigError
from train.callbacks import Callback, default_callbacks
from train.callbacks.norm_removal import NormRemoval, removable_norms
from train.cli import main
from train.runtime import load_model
from train.trainer import train

FAST = {"start_step": 1, "gap_ffn": 1, "gap_qk": 1, "gap_v": 1, "final_after": 1, "eot_after": 1, "bos_after": 1}
SWITCHES = [(1, "ffn", 0), (2, "ffn", 1), (3, "qk", 0), (4, "qk", 1), (5, "v", 0), (6, "v", 1),
            (7, "final", None), (8, "eot", None), (9, "bos", None)]


class StopAfter(Callback):
    """Writes the run's STOP file after step `step`: the trainer saves and requeues there."""

    name = "test_stop"

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, metrics) -> None:
        if state.step == self.step and state.run is not None:
            (state.run.path / "STOP").write_text("")


@pytest.fixture(scope="module")
def runs(finished_run, tiny_dict, tmp_path_factory):
    root = tmp_path_factory.mktemp("norm_removal")
    over = dict(init_from=str(finished_run), train__steps=10, train__val_every=0, checkpoint__every=4,
                model__norm__removal=FAST)
    cfg = make_cfg(tiny_dict, **over)
    assert train(cfg, root / "ref").status == "done"
    cfg = make_cfg(tiny_dict, **over)
    assert train(cfg, root / "cut", callbacks=default_callbacks(cfg) + [StopAfter(5)]).status == "requeue"
    assert train(make_cfg(tiny_dict, **over), root / "cut").status == "done"
    return root


def _switches(run) -> list[tuple]:
    return [(r["step"], r["group"], r.get("layer")) for r in train_rows(run, "event") if r["event"] == "norm_switch"]


def test_schedule_flips_exactly_the_scheduled_norms_across_a_resume(runs):
    assert _switches(runs / "ref") == SWITCHES
    assert _switches(runs / "cut") == SWITCHES                  # each once, the first segment's up to step 5
    resumes = [r for r in train_rows(runs / "cut", "event") if r["event"] == "resume"]
    assert [r["step"] for r in resumes] == [5]
    ref_rows, cut_rows = train_rows(runs / "ref"), train_rows(runs / "cut")
    assert [r["step"] for r in cut_rows] == list(range(1, 11))
    assert [r["loss"] for r in cut_rows] == [r["loss"] for r in ref_rows]      # exact resume
    ref_std = {r["norm"]: r["std"] for r in train_rows(runs / "ref", "event") if r["event"] == "norm_switch"
               and "norm" in r}
    assert ref_std == {r["norm"]: r["std"] for r in train_rows(runs / "cut", "event")
                       if r["event"] == "norm_switch" and "norm" in r}
    # the state after each checkpointed step is what the schedule says
    for step in (4, 8):
        model, cfg, _ = load_model(runs / "ref", step)
        norms = removable_norms(model)
        assert sorted(norms) == sorted([f"blocks.{i}.{n}" for i in (0, 1)
                                        for n in ("mixer_norm", "mixer_norm_v", "ffn_norm")] + ["final_norm"])
        fake = {name for name, n in norms.items() if bool(n.fake)}
        assert fake == {f"blocks.{layer}.{ {'ffn': 'ffn_norm', 'qk': 'mixer_norm', 'v': 'mixer_norm_v'}[g] }"
                        if g != "final" else "final_norm" for s, g, layer in SWITCHES if s <= step and g not in
                        ("eot", "bos")}
        special = {tuple(bool(x) for x in n.special) for n in norms.values()}
        assert special == {(step < 8, True)}
    model, _, _ = load_model(runs / "ref")
    assert all(n.finished for n in removable_norms(model).values())
    std = {name: float(n.std[0]) for name, n in removable_norms(model).items()}
    assert std == pytest.approx(ref_std, rel=1e-6)


def test_the_first_frozen_std_is_the_previous_steps_divisor(runs, finished_run, tiny_dict):
    """Recomputed independently: layer 0's FFN norm switches at step 1 with the mean RMS of its
    input over step 0's batch (global samples 0..7), under the init_from weights; EOT tokens (the
    tokenizer's EOS, resolved into the config) and position 0 apart."""
    from train.data import prepare_data
    from train.runtime import load_run_config
    cfg = load_run_config(runs / "ref")
    eot = cfg.model.norm.removal.eot_token
    assert eot is not None
    data = prepare_data(make_cfg(tiny_dict), progress=False)
    ids = data.train_samples(cfg.data.seq_len, cfg.data.seed).batch(np.arange(8))["input_ids"]
    model, _, _ = load_model(finished_run)
    seen = {}
    model.blocks[0].ffn_norm.register_forward_pre_hook(lambda m, args: seen.update(x=args[0].detach()))
    with torch.no_grad():
        model.train()(ids)
    rms = (seen["x"].double().pow(2).mean(-1) + cfg.model.norm.eps).sqrt()
    first = torch.zeros_like(ids, dtype=torch.bool)
    first[:, 0] = True
    is_eot = (ids == eot) & ~first
    [row] = [r for r in train_rows(runs / "ref", "event") if r["event"] == "norm_switch" and r["step"] == 1]
    assert row["norm"] == "blocks.0.ffn_norm"
    assert row["std"] == pytest.approx(float(rms[~first & ~is_eot].mean()), rel=1e-6)
    assert row["std_bos"] == pytest.approx(float(rms[first].mean()), rel=1e-6)
    assert bool(is_eot.any()) and row["std_eot"] == pytest.approx(float(rms[is_eot].mean()), rel=1e-6)


def test_fold_norms_writes_a_run_with_the_same_logits(runs, tmp_path, tiny_dict, capsys):
    assert main(["checkpoint", "fold-norms", str(runs / "ref")]) == 0
    out = runs / "ref-folded"
    record = json.loads((out / "fold.json").read_text())
    assert record["step"] == 10 and record["max_abs_logit_diff"] < 1e-5
    folded, cfg, step = load_model(out)
    assert step == 10 and cfg.model.norm.block == cfg.model.norm.final == "none" and not cfg.model.tie_embeddings
    assert cfg.model.norm.removal is None and not any(isinstance(m, RemovableNorm) for m in folded.modules())
    source, _, _ = load_model(runs / "ref")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(folded(ids).logits, source(ids).logits, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer").is_dir()
    capsys.readouterr()
    assert main(["generate", str(out), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
    # a new run initialised from the folded one trains
    assert train(make_cfg(tiny_dict, init_from=str(out), train__steps=1, checkpoint__every=0,
                          model__norm={"block": "none", "final": "none"}, model__tie_embeddings=False),
                 tmp_path / "from_folded").status == "done"
    # an existing fold is not overwritten without --force
    assert main(["checkpoint", "fold-norms", str(runs / "ref")]) == 2
    assert "already holds a folded run" in capsys.readouterr().err


def test_fold_norms_refuses_an_unfinished_schedule(runs, capsys, tmp_path):
    assert main(["checkpoint", "fold-norms", str(runs / "ref"), "--step", "8", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "has not finished" in err and "step-00000008" in err and not (tmp_path / "x").exists()


def test_removal_config_errors(finished_run, tiny_dict, runs, tmp_path):
    for steps in (8, 9):             # the last switch is at step 9: some step must train with it
        with pytest.raises(ConfigError) as e:
            make_cfg(tiny_dict, train__steps=steps, model__norm__removal=FAST)
        assert e.value.key == "model.norm.removal" and "step 9" in e.value.message
    # starting a removal schedule from a run whose norms are already fake
    cfg = make_cfg(tiny_dict, init_from=str(runs / "ref"), train__steps=10, checkpoint__every=0,
                   model__norm__removal=FAST)
    with pytest.raises(RuntimeError, match="already switched"):
        train(cfg, tmp_path / "again")


def test_frozen_std_is_summed_over_data_parallel_ranks():
    """The capture all-reduces (sum, count): a second rank's batch with a different std moves the
    frozen std to the mean over both ranks' tokens."""
    cfg = models.model_config({"d_model": 8, "n_layers": 1, "n_heads": 2, "vocab_size": 32, "max_seq_len": 16,
                               "norm": {"removal": dict(FAST)}})
    model = models.Decoder(cfg, init_seed=0).double().train()
    other = torch.tensor([[30.0, 0.0, 0.0], [10.0, 0.0, 0.0]], dtype=torch.float64)   # rank 1: 10 tokens, std 3
    backend = SimpleNamespace(all_sum=lambda t: t + other)
    logged = []
    state = SimpleNamespace(model=model, step=0, backend=backend, device=torch.device("cpu"), log=logged.append)
    cb = NormRemoval(removal_schedule(cfg.norm.removal, 1))
    norm = model.blocks[0].ffn_norm
    model(torch.randint(1, 32, (2, 6)))           # an earlier forward: on_step_start zeroes its sums
    cb.on_step_start(state)                       # step 0 runs: layer 0's FFN norm switches after it
    assert float(norm.stats.abs().sum()) == 0.0
    model(torch.randint(1, 32, (2, 6)))
    mine = norm.stats.clone()
    state.step = 1
    cb.on_step_end(state, {})
    want = (mine[0, 0] + 30.0) / (mine[1, 0] + 10.0)
    assert bool(norm.fake) and float(norm.std[0]) == pytest.approx(float(want), rel=1e-12)
    assert logged[0]["event"] == "norm_switch" and logged[0]["std"] == pytest.approx(float(want), rel=1e-12)
