"""The ReLU fine-tune schedule (StochA+FT / Swi+FT), FFN sparsity (metric rows and the checkpoint
probe) and the trainer's sample-index plumbing for stochastic activations.

The `test_trainer_*`, `test_switch_survives_resume` and `test_stochastic_seed_*` tests rely on
the trainer calling `apply_activation_schedule`, passing `sample_index=` and logging the
`ffn_sparsity` probe row, and on train/config.py resolving `model.ffn.stochastic.seed: null` to
the run's `seed`.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ablate_testing import copy_run, make_cfg, train_rows
from train.cli import run_callbacks
from train.config import resolve_config

import models
from models.config import model_config
from train.callbacks.activation_schedule import (apply_activation_schedule, apply_checkpoint_activation,
                                       relu_finetune_active, relu_switch_step)
from eval.probes.sparsity import ffn_sparsity, ffn_sparsity_rows, format_sparsity, sparsity_probe

V = 59


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than two contending ones."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class RunCfg:
    """The two keys the schedule reads, without a full run config."""

    def __init__(self, steps: int, alpha: float, model_cfg):
        self.train = type("T", (), {"steps": steps})()
        self.model = model_cfg


def tiny(kind="glu", act="swiglu", alpha=0.0, **ffn):
    cfg = model_config({"d_model": 16, "n_layers": 2, "n_heads": 2, "vocab_size": V,
                        "ffn": {"kind": kind, "activation": act, "relu_finetune_frac": alpha, **ffn}})
    torch.manual_seed(0)
    return models.Decoder(cfg).double(), cfg


def flags(model) -> list[bool]:
    return [m.relu_finetune for m in model.modules() if hasattr(m, "relu_finetune")]


# ----------------------------------------------------------------------------- switch step
@pytest.mark.parametrize("alpha, steps, switch", [
    (0.1, 10, 9), (0.9, 10, 1), (0.3, 10, 7), (0.7, 10, 3), (0.05, 200, 190), (0.05, 2000, 1900),
    (0.07, 100, 93), (0.25, 12, 9), (0.2, 7, 5), (1.0, 50, 0), (0.001, 10, 9)])
def test_switch_step_is_floor_of_one_minus_alpha_times_steps(alpha, steps, switch):
    assert relu_switch_step(steps, alpha) == switch


def test_switch_step_exact_for_all_decimal_alphas():
    """floor((1 - a) S) == S - ceil(a S) in exact arithmetic, for a = k / 1000 (floats would drift)."""
    for k in range(1, 1001, 7):
        for steps in (1, 3, 10, 97, 100, 1000, 12345):
            assert relu_switch_step(steps, k / 1000) == steps - (-(-k * steps // 1000)), (k, steps)
    assert relu_switch_step(100, 0.0) is None


def test_schedule_is_stateless_so_it_survives_resume():
    steps, alpha = 20, 0.25                       # switch at 15
    model, mcfg = tiny(alpha=alpha)
    run = RunCfg(steps, alpha, mcfg)
    events = []
    for s in range(steps):
        ev = apply_activation_schedule(model, s, run)
        events.append(ev)
        fresh, _ = tiny(alpha=alpha)              # a resumed run: a new model, nothing restored
        ev_fresh = apply_activation_schedule(fresh, s, run)
        assert flags(fresh) == flags(model) == [s >= 15] * 2, s
        assert relu_finetune_active(s, run) == (s >= 15)
        assert (ev_fresh is not None) == (s >= 15)            # a resume after the switch announces it
    assert [i for i, e in enumerate(events) if e is not None] == [15]
    assert events[15] == {"kind": "event", "event": "activation_switch", "step": 15, "activation": "relu",
                          "switch_step": 15}


def test_swi_ft_turns_swiglu_into_reglu():
    model, mcfg = tiny("glu", "swiglu", alpha=0.5)
    reglu, _ = tiny("glu", "reglu")
    reglu.load_state_dict(model.state_dict())
    swiglu, _ = tiny("glu", "swiglu")
    swiglu.load_state_dict(model.state_dict())
    x = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(0))
    run = RunCfg(10, 0.5, mcfg)
    apply_activation_schedule(model, 4, run)
    assert torch.equal(model(x).logits, swiglu(x).logits)
    apply_activation_schedule(model, 5, run)
    for mode in (model.train, model.eval):
        mode()
        assert torch.equal(model(x).logits, reglu(x).logits)


@pytest.mark.parametrize("kind, act", [("mlp", "silu"), ("mlp", "stochastic"), ("glu", "stochastic")])
def test_finetune_switches_silu_and_stochastic_to_relu(kind, act):
    model, mcfg = tiny(kind, act, alpha=0.1, stochastic={"eval_mode": "silu"})
    acts = [b.ffn.act for b in model.blocks]
    u = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    apply_activation_schedule(model, 8, RunCfg(10, 0.1, mcfg))
    assert all(not a.relu_finetune for a in acts)
    apply_activation_schedule(model, 9, RunCfg(10, 0.1, mcfg))
    for a in acts:
        assert torch.equal(a.train()(u) if act == "silu" else a.train()(u, None), F.relu(u))


def test_schedule_reaches_through_wrappers_and_sets_the_step():
    model, mcfg = tiny("mlp", "stochastic", alpha=0.5, stochastic={"granularity": "call"})

    class Wrapper(torch.nn.Module):               # like DDP / torch.compile: the model is a submodule
        def __init__(self, module):
            super().__init__()
            self.module = module

    apply_activation_schedule(Wrapper(model), 3, RunCfg(10, 0.5, mcfg))
    assert all(b.ffn.act.step == 3 for b in model.blocks)
    apply_activation_schedule(Wrapper(model), 6, RunCfg(10, 0.5, mcfg))
    assert flags(model) == [True, True]


def test_checkpoint_mode_is_that_of_the_last_update():
    model, mcfg = tiny(alpha=0.25)
    run = RunCfg(12, 0.25, mcfg)                   # switch at 0-based step 9
    apply_checkpoint_activation(model, 9, run)     # 9 updates done, the last at step 8: SiLU
    assert flags(model) == [False, False]
    apply_checkpoint_activation(model, 10, run)    # the update at step 9 ran ReLU
    assert flags(model) == [True, True]


# ----------------------------------------------------------------------------- sparsity
def batches_of(n: int, B: int = 3, T: int = 9):
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, V, (B, T), generator=g), "indices": torch.arange(i * B, i * B + B)}
            for i in range(n)]


def test_sparsity_counts_exact_zeros_of_the_activation_output():
    model, _ = tiny("mlp", "relu")
    batches = batches_of(2)
    expected = []
    for block in model.blocks:
        seen = []
        h = block.ffn.w1.register_forward_hook(lambda m, i, o: seen.append(o))
        with torch.no_grad():
            for b in batches:
                model(b["input_ids"])
        h.remove()
        u = torch.cat([s.flatten() for s in seen])
        expected.append(float((torch.relu(u) == 0).double().mean()))
    model.train()
    got = ffn_sparsity(model, batches)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.2 < got[0] < 0.8
    assert model.training                                   # mode restored


def test_sparsity_of_glu_is_measured_on_the_gate():
    model, _ = tiny("glu", "reglu")
    gate_zero = []
    blk = model.blocks[1].ffn
    h = blk.w_in.register_forward_hook(lambda m, i, o: gate_zero.append(o.chunk(2, -1)[0] <= 0))
    got = ffn_sparsity(model, batches_of(1))
    h.remove()
    assert got[1] == pytest.approx(float(gate_zero[0].double().mean()), abs=1e-12)
    swi, _ = tiny("glu", "swiglu")
    assert ffn_sparsity(swi, batches_of(1)) == [0.0, 0.0]   # SiLU has no exact zeros


def test_sparsity_row_and_layers_without_activation():
    fused, _ = tiny("fused_linear", "identity")
    assert ffn_sparsity(fused, batches_of(1)) == [None, None]
    assert ffn_sparsity_rows(fused, batches_of(1), 5) == []
    model, _ = tiny("mlp", "relu")
    rows = ffn_sparsity_rows(model, batches_of(1), 5)
    assert all(r["kind"] == "probe" and r["probe"] == "sparsity" and r["step"] == 5 and r["head"] is None
               for r in rows)
    assert [r["layer"] for r in rows] == [0, 1, None]            # per layer, then the model (layer null)
    assert rows[2]["value"] == pytest.approx((rows[0]["value"] + rows[1]["value"]) / 2)
    json.dumps(rows)


# ----------------------------------------------------------------------------- trainer integration
ALPHA = 0.25        # 12 steps -> ReLU from 0-based step 9: logged train rows 10, 11, 12


@pytest.fixture(scope="module")
def ft_run(tmp_path_factory, tiny_dict) -> Path:
    from train.trainer import train
    run_dir = tmp_path_factory.mktemp("ffn") / "swi_ft"
    cfg = make_cfg(tiny_dict, model__ffn__relu_finetune_frac=ALPHA)
    result = train(cfg, run_dir, callbacks=run_callbacks(cfg))       # with the sparsity probe
    assert result.status == "done"
    return run_dir


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in train_rows(run)]


def test_trainer_switches_at_the_exact_step(ft_run, finished_run):
    """Same data and init as the plain SwiGLU run: identical losses until the switch, then not."""
    ft, base = losses(ft_run), losses(finished_run)
    switch = relu_switch_step(12, ALPHA)
    assert switch == 9
    assert ft[:switch] == base[:switch]                 # rows 1..9: updates at 0-based steps 0..8
    assert ft[switch] != base[switch]                   # row 10: the first ReLU forward
    events = [e for e in train_rows(ft_run, "event") if e["event"] == "activation_switch"]
    assert [(e["step"], e["activation"]) for e in events] == [(9, "relu")]


def test_switch_survives_resume(ft_run, tmp_path, tiny_dict):
    from train.trainer import train
    for ckpt_step, name in ((8, "before"), (4, "long_before")):
        run = copy_run(ft_run, tmp_path / name)
        for step in (12, 8) if ckpt_step == 4 else (12,):
            shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
        (run / "DONE").unlink()
        cfg = make_cfg(tiny_dict, model__ffn__relu_finetune_frac=ALPHA)
        assert train(cfg, run, callbacks=run_callbacks(cfg)).status == "done"
        assert losses(run) == losses(ft_run)            # bit-for-bit, the switch included
        events = [e for e in train_rows(run, "event") if e["event"] == "activation_switch"]
        assert [e["step"] for e in events] == [9]


def test_trainer_logs_ffn_sparsity_probe_rows(ft_run):
    layers: dict[int, list[float]] = {}
    for r in train_rows(ft_run, "probe"):
        if r["probe"] == "sparsity" and r["layer"] is not None:
            layers.setdefault(r["step"], []).append(r["value"])
    assert set(layers) >= {6, 12}                        # after each validation (val_every 6)
    assert layers[6] == [0.0, 0.0]                       # SwiGLU: no exact zeros
    assert all(0.2 < v < 0.9 for v in layers[12])        # ReGLU gate after the switch


def test_trainer_passes_global_sample_indices(tmp_path, tiny_dict, monkeypatch):
    from train.trainer import train
    seen: list[list[int] | None] = []
    forward = models.Decoder.forward

    def spy(self, input_ids, *args, sample_index=None, **kwargs):
        if torch.is_grad_enabled() and self.training:
            seen.append(None if sample_index is None else sample_index.tolist())
        return forward(self, input_ids, *args, sample_index=sample_index, **kwargs)

    monkeypatch.setattr(models.Decoder, "forward", spy)
    cfg = make_cfg(tiny_dict, train__steps=2, model__ffn__kind="mlp", model__ffn__activation="stochastic")
    assert train(cfg, tmp_path / "run").status == "done"
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]   # micro_batch 4, accum 2


def test_stochastic_seed_defaults_to_the_run_seed(tiny_dict):
    cfg = make_cfg(tiny_dict, seed=7, model__ffn__kind="mlp", model__ffn__activation="stochastic")
    assert cfg.model.ffn.stochastic.seed is None             # validation leaves it; resolve sets it
    assert resolve_config(cfg, 300) == {"model.vocab_size": "tokenizer", "model.ffn.stochastic.seed": "seed"}
    assert cfg.model.ffn.stochastic.seed == 7 and cfg.model.vocab_size == 320
    cfg = make_cfg(tiny_dict, seed=7, model__ffn__kind="mlp", model__ffn__activation="stochastic",
                   model__ffn__stochastic__seed=3)
    assert "model.ffn.stochastic.seed" not in resolve_config(cfg, 300)
    assert cfg.model.ffn.stochastic.seed == 3                # an explicit seed wins
    cfg = make_cfg(tiny_dict, seed=7)
    resolve_config(cfg, 300)
    assert cfg.model.ffn.stochastic.seed is None             # unused: left alone


# ----------------------------------------------------------------------------- probe command
def test_sparsity_probe_of_checkpoints(ft_run):
    final = sparsity_probe(ft_run, "latest")
    assert final["step"] == 12 and final["mode"] == "relu (fine-tune)"
    assert len(final["layers"]) == 2 and all(0.2 < v < 0.9 for v in final["layers"])
    assert final["mean"] == pytest.approx(sum(final["layers"]) / 2)
    early = sparsity_probe(ft_run, 8)                  # before the switch: SiLU gate, no exact zeros
    assert early["step"] == 8 and early["mode"] == "SiLU" and early["layers"] == [0.0, 0.0]
    text = format_sparsity(final)
    assert "layer   0" in text and "mean" in text and "relu (fine-tune)" in text
