"""The trainer's contracts: a reusable `train_step` (also without a run dir), one host read per
step, loss terms weighted by their reduction, callbacks with checkpointed state, group
statistics and the profiler window, bench through the backend, and `train/` not importing `eval/`."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from ablate_testing import REPO, make_cfg, rewind, train_rows
from test_models.doubles import registered

from train.bench import random_batches
from train.callbacks import Callback, default_callbacks
from train.parallel import init_distributed, shutdown_distributed
from train.trainer import Trainer, train


def test_train_does_not_import_eval():
    """Only the composition root (train/cli.py, train/__main__.py) may import eval/."""
    offenders = []
    for path in sorted((REPO / "train").rglob("*.py")):
        if path.name in ("cli.py", "__main__.py") and path.parent == REPO / "train":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            if any(n == "eval" or n.startswith("eval.") for n in names):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"train/ modules importing eval/: {offenders}"


def _trainer(tiny_dict, **over) -> Trainer:
    cfg = make_cfg(tiny_dict, model__vocab_size=384, **over)
    t = Trainer(cfg)
    t.build()
    return t


@pytest.mark.parametrize("backend", ["none", "ddp", "fsdp2"])
def test_one_host_read_per_step(tiny_dict, backend):
    """With accumulation 4, a profiled train_step reads a value from the device at most once
    (`.item()` / `float()` dispatch aten::_local_scalar_dense). torch's AdamW reads its own step
    counters, which live on the host even on GPUs (non-fused AdamW), so its calls are left out."""
    info = init_distributed(backend, "cpu", 60.0)
    try:
        cfg = make_cfg(tiny_dict, model__vocab_size=384, train__global_batch=16, train__micro_batch=4,
                       parallel__backend=backend)
        t = Trainer(cfg, info=info)
        t.build()
        assert t.accum == 4
        batches = random_batches(cfg, t.accum)
        t.train_step(batches)                          # warm up (lazy init, first optimizer state)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            metrics = t.train_step(batches)
        reads = []
        for e in prof.events():
            if e.name != "aten::_local_scalar_dense":
                continue
            parents, p = [], e.cpu_parent
            while p is not None:
                parents.append(p.name)
                p = p.cpu_parent
            if not any(name.startswith("Optimizer.step#") for name in parents):
                reads.append(parents)
        assert len(reads) <= 1, reads
        assert metrics["update"] == "applied" and metrics["loss"] > 0
    finally:
        shutdown_distributed()


def test_train_step_without_a_run_dir(tiny_dict, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    t = _trainer(tiny_dict)
    assert t.run is None and t.state.run is None
    batches = random_batches(t.cfg, t.accum)
    losses = [t.train_step(batches)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0]                      # one fixed batch: memorised
    assert t.state.step == 4
    assert list(tmp_path.iterdir()) == []              # no metrics, no checkpoints, nothing written


def test_mean_terms_reproduce_the_whole_step_mean(tiny_dict):
    """A mean-reduced term (the test double's aux loss) and the summed CE give the same gradients
    with 1 micro-batch of 8 as with 2 of 4: the objective is the whole step's mean."""
    layers = {"pattern": "D", "mixers": {"D": {"kind": "test_double", "aux_weight": 0.5}}}
    grads = []

    def recording(backend):
        step = backend.optimizer_step

        def optimizer_step(model, optimizer):     # the gradients the update is about to use
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            return step(model, optimizer)
        backend.optimizer_step = optimizer_step

    with registered():
        one = _trainer(tiny_dict, model__layers=layers, train__micro_batch=8)
        two = _trainer(tiny_dict, model__layers=layers, train__micro_batch=4)
        recording(one.backend), recording(two.backend)
        [whole] = random_batches(one.cfg, 1)
        halves = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
        m1, m2 = one.train_step([whole]), two.train_step(halves)
    for key in ("loss", "loss_test_aux", "loss_total", "grad_norm"):
        assert m1[key] == pytest.approx(m2[key], rel=1e-5), key
    assert m1["loss_total"] == pytest.approx(m1["loss"] + m1["loss_test_aux"], rel=1e-12)
    assert m1["loss_test_aux"] > 0
    g1, g2 = grads
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], rtol=1e-4, atol=1e-8, msg=name)


class Counter(Callback):
    """Counts the steps it saw; its count is checkpointed."""

    def __init__(self) -> None:
        self.seen = 0
        self.loaded: dict | None = None

    def on_step_end(self, state, metrics) -> None:
        self.seen += 1

    def on_checkpoint(self, state) -> dict:
        return {"seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.loaded = dict(state)
        self.seen = state.get("seen", 0)


def test_callback_state_is_saved_and_restored(tiny_dict, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(tiny_dict, train__steps=4, checkpoint__every=2, train__val_every=0)
    first = Counter()
    first.name = "counter"
    assert train(cfg, run, callbacks=default_callbacks(cfg) + [first]).status == "done"
    assert first.seen == 4
    state = torch.load(run / "checkpoints" / "step-00000002" / "trainer_state.pt", weights_only=False)
    assert state["callbacks"]["counter"] == {"seen": 2}
    rewind(run, 2)
    again = Counter()
    again.name = "counter"
    assert train(cfg, run, callbacks=default_callbacks(cfg) + [again]).status == "done"
    assert again.loaded == {"seen": 2} and again.seen == 4


def test_group_norms_and_profile_window(tiny_dict, tmp_path):
    run = tmp_path / "run"
    cfg = make_cfg(tiny_dict, train__steps=4, train__log_every=2, checkpoint__every=0, train__val_every=0,
                   train__log_group_norms=True, train__profile={"start": 1, "steps": 2})
    assert train(cfg, run).status == "done"
    rows = train_rows(run)
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert r["grad_norm/hidden_matrix"] > 0 and 0 < r["update_ratio/hidden_matrix"] < 1
        assert "update_ratio/embedding" in r and "grad_norm/norm_gain" in r
    [event] = [e for e in train_rows(run, "event") if e["event"] == "profile"]
    assert event["steps"] == [2, 3]
    trace = json.loads(Path(event["path"]).read_text())
    assert Path(event["path"]).parent == run / "profile" and trace["traceEvents"]


def test_bench_times_train_step_through_the_backend_and_mixers(tiny_dict, capsys):
    from train.cli import main
    cfg_path = Path(tiny_dict["data"]["cache_dir"]) / "bench.yaml"
    import yaml
    cfg_path.write_text(yaml.safe_dump(tiny_dict))
    assert main(["bench", str(cfg_path), "parallel.activation_checkpointing=full", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "activation checkpointing: full" in out and "ms/step" in out
    assert main(["bench", str(cfg_path), "--mixers", "--seq-lens", "16,32", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "A: attention    T=16" in out and "T=32" in out
    # a mixer with two forms gets their ratio per length: DeltaNet's chunkwise against its recurrence
    assert main(["bench", str(cfg_path), "model.layers.pattern=AD", "model.layers.mixers={A: {kind: attention}, D: {kind: deltanet}}",
                 "--mixers", "--seq-lens", "16", "--steps", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"D: deltanet +T=16 +torch_chunk is [0-9.]+x faster than torch_recurrent", out), out
    # and, with bench_core, each form's delta rule alone, without the projections both forms share
    for kernel in ("torch_chunk", "torch_recurrent"):
        assert re.search(rf"D: deltanet +T=16 +[0-9.]+ ms .* {kernel} core alone", out), out
    assert re.search(r"T=16 +core alone: torch_chunk is [0-9.]+x faster than torch_recurrent", out), out
    assert main(["bench", str(cfg_path), "--mixers", "--seq-lens", "x"]) == 2
