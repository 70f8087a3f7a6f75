"""Trainer: loss goes down, exact resume, atomic checkpoints, finite guard, stop/requeue, drift."""
from __future__ import annotations

import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from ablate_testing import REPO, copy_run, make_cfg, subprocess_env, train_rows, wait_for, with_nan, write_config

from models.registry import ConfigError
from train import checkpoint as ckpt
from train.trainer import train


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in train_rows(run_dir)}


def test_loss_decreases_and_run_dir_layout(finished_run):
    rows = train_rows(finished_run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gb", "time_s"):
        assert key in rows[0]
    assert rows[0]["tokens"] == 8 * 32 and rows[0]["mfu"] is None
    val = train_rows(finished_run, "val")
    assert [r["step"] for r in val] == [6, 12]
    assert math.isclose(val[-1]["val_ppl"], math.exp(val[-1]["val_loss"]), rel_tol=1e-9)
    assert (finished_run / "DONE").exists() and not (finished_run / "FAILED").exists()
    assert (finished_run / "tokenizer" / "tokenizer.json").exists()
    cfg_text = (finished_run / "config.yaml").read_text()
    assert "code_version" in cfg_text and "vocab_size: 384" in cfg_text
    import yaml
    saved = yaml.safe_load(cfg_text)
    assert saved["derived"] == {"model.vocab_size": "tokenizer"}     # what was set after validation
    assert all(r["loss_total"] == r["loss"] for r in rows)           # no term besides CE here
    steps = [s for s, _ in ckpt.complete_checkpoints(finished_run / "checkpoints")]
    assert steps == [4, 8, 12]
    events = train_rows(finished_run, "event")
    saved = [e for e in events if e["event"] == "checkpoint"]
    assert [e["step"] for e in saved] == [4, 8, 12] and all(e["bytes"] > 0 for e in saved)


def test_samples_are_consumed_in_order_without_gaps(finished_run):
    rows = train_rows(finished_run)
    for r in rows:
        assert r["samples"] == [(r["step"] - 1) * 8, r["step"] * 8 - 1]


def test_exact_resume_from_checkpoint(finished_run, tmp_path, tiny_dict):
    run = copy_run(finished_run, tmp_path / "run")
    # drop the two newest checkpoints and the DONE marker: the run resumes from step 4
    for step in (8, 12):
        import shutil
        shutil.rmtree(run / "checkpoints" / f"step-{step:08d}")
    (run / "DONE").unlink()
    result = train(make_cfg(tiny_dict), run)
    assert result.status == "done"
    assert losses(run) == losses(finished_run)          # bit-for-bit on CPU
    assert [r["step"] for r in train_rows(run)] == list(range(1, 13))   # rows after step 4 replaced once
    resumes = [e for e in train_rows(run, "event") if e["event"] == "resume"]
    assert resumes[-1]["step"] == 4


def test_extend_finished_run(finished_run, tmp_path, tiny_dict):
    run = copy_run(finished_run, tmp_path / "run")
    result = train(make_cfg(tiny_dict, train__steps=14), run)
    assert result.status == "done" and result.step == 14
    assert [r["step"] for r in train_rows(run)] == list(range(1, 15))
    assert (run / "checkpoints" / "step-00000014" / "COMPLETE").exists()


def test_config_drift_is_refused(finished_run, tmp_path, tiny_dict):
    run = copy_run(finished_run, tmp_path / "run")
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, model__d_model=64), run)
    assert "model.d_model" in str(e.value)
    before = (run / "config.yaml").read_text()
    assert before == (finished_run / "config.yaml").read_text()    # nothing overwritten


def test_wsd_decay_branch_from_stable_checkpoint(tmp_path, tiny_dict):
    run = tmp_path / "wsd"
    stable = dict(train__steps=8, optim__schedule__kind="wsd", optim__schedule__decay_frac=0.0,
                  optim__schedule__warmup=0, checkpoint__every=4)
    train(make_cfg(tiny_dict, **stable), run)
    assert all(r["lr"] == pytest.approx(1e-2) for r in train_rows(run))
    # branch off: 4 more steps that decay from step 8 to min_lr_ratio
    decay = dict(stable, train__steps=12, optim__schedule__decay_start=8)
    train(make_cfg(tiny_dict, **decay), run)
    lrs = [r["lr"] for r in train_rows(run)]
    assert lrs[:8] == pytest.approx([1e-2] * 8)
    assert all(a > b for a, b in zip(lrs[8:], lrs[9:])) and lrs[8] <= 1e-2
    assert lrs[-1] >= 1e-3 - 1e-12


def test_muon_trains(tmp_path, tiny_dict):
    run = tmp_path / "muon"
    train(make_cfg(tiny_dict, optim__name="muon", checkpoint__every=0), run)
    rows = train_rows(run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5


def test_nonfinite_skip_leaves_parameters_unchanged(tmp_path, tiny_dict):
    run = tmp_path / "nan"
    cfg = make_cfg(tiny_dict, train__steps=4, checkpoint__every=1)
    result = train(cfg, run, callbacks=with_nan(cfg, {3}))
    assert result.status == "done"
    skips = [e for e in train_rows(run, "event") if e["event"] == "skip_nonfinite"]
    assert [e["step"] for e in skips] == [3]
    from train.runtime import load_model
    m2, _, _ = load_model(run, 2)
    m3, _, _ = load_model(run, 3)
    m4, _, _ = load_model(run, 4)
    assert all(torch.equal(a, b) for a, b in zip(m2.parameters(), m3.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(m3.parameters(), m4.parameters()))


def test_nonfinite_halt_marks_failed(tmp_path, tiny_dict):
    run = tmp_path / "halt"
    cfg = make_cfg(tiny_dict, train__steps=4, train__nonfinite="halt")
    with pytest.raises(FloatingPointError):
        train(cfg, run, callbacks=with_nan(cfg, {2}))
    failed = (run / "FAILED").read_text()
    assert "non-finite" in failed.splitlines()[0] and "step 2" in failed


def test_crash_during_save_keeps_previous_checkpoint(finished_run, tmp_path, monkeypatch):
    run = copy_run(finished_run, tmp_path / "run")
    from train.runtime import load_model
    model, _, _ = load_model(run)

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt.dcp, "save", boom)
    with pytest.raises(OSError):
        ckpt.save_checkpoint(run / "checkpoints", 16, model, None, {"step": 16})
    assert ckpt.latest_checkpoint(run / "checkpoints")[0] == 12
    monkeypatch.undo()
    ckpt.clean_partial(run / "checkpoints")
    assert not any(p.name.startswith(".tmp") for p in (run / "checkpoints").iterdir())
    again, _, step = load_model(run)
    assert step == 12


def test_prune_keeps_last_and_every(tmp_path):
    root = tmp_path / "ck"
    for s in range(1, 9):
        d = root / f"step-{s:08d}"
        d.mkdir(parents=True)
        (d / "COMPLETE").write_text("")
    ckpt.prune(root, keep_last=2, keep_every=4)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [4, 7, 8]


def test_init_from_loads_weights_only(finished_run, tmp_path, tiny_dict):
    run = tmp_path / "child"
    result = train(make_cfg(tiny_dict, init_from=str(finished_run), train__steps=2), run)
    assert result.status == "done"
    first = train_rows(run)[0]
    assert first["samples"] == [0, 7]                                    # fresh data position
    assert first["loss"] < train_rows(finished_run)[0]["loss"] - 0.5     # trained weights


# ----------------------------------------------------------------------------- subprocess flows
def _start(cfg_path: Path, run_dir: Path, cache_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "train", str(cfg_path), "--run-dir", str(run_dir)],
                            cwd=REPO, env=subprocess_env(cache_dir), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


LONG = {"train": {"steps": 60, "log_every": 1, "val_every": 0}, "checkpoint": {"every": 5, "keep_last": 3}}


def _long_cfg(tiny_dict: dict, tmp_path: Path) -> Path:
    from train.config import _deep_merge
    return write_config(tmp_path / "long.yaml", _deep_merge(tiny_dict, LONG))


@pytest.mark.slow
def test_sigkill_then_resume_consumes_every_sample_once(tmp_path, tiny_dict, cache_dir):
    cfg_path = _long_cfg(tiny_dict, tmp_path)
    reference = tmp_path / "ref"
    assert subprocess.run([sys.executable, "-m", "train", str(cfg_path), "--run-dir", str(reference)],
                          cwd=REPO, env=subprocess_env(cache_dir), capture_output=True).returncode == 0
    run = tmp_path / "killed"
    proc = _start(cfg_path, run, cache_dir)
    wait_for(lambda: (run / "checkpoints" / "step-00000010" / "COMPLETE").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "DONE").exists()
    proc = _start(cfg_path, run, cache_dir)
    assert proc.wait(timeout=120) == 0, proc.stdout.read()
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert [r["samples"] for r in rows] == [[8 * i, 8 * i + 7] for i in range(60)]
    assert losses(run) == losses(reference)


@pytest.mark.slow
def test_stop_file_and_signals_requeue(tmp_path, tiny_dict, cache_dir):
    cfg_path = _long_cfg(tiny_dict, tmp_path)
    run = tmp_path / "stopped"
    proc = _start(cfg_path, run, cache_dir)
    wait_for(lambda: len(train_rows(run)) >= 3 if (run / "metrics.jsonl").exists() else False, proc)
    (run / "STOP").write_text("")
    assert proc.wait(timeout=60) == 0
    assert (run / "REQUEUE").exists() and not (run / "DONE").exists() and not (run / "STOP").exists()
    stopped_at = ckpt.latest_checkpoint(run / "checkpoints")[0]
    assert stopped_at >= 3

    # SIGTERM, then a second SIGTERM while it saves: exit 0, a complete loadable checkpoint
    proc = _start(cfg_path, run, cache_dir)
    wait_for(lambda: len(train_rows(run)) >= stopped_at + 3, proc)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    assert (run / "REQUEUE").exists()
    latest = ckpt.latest_checkpoint(run / "checkpoints")[0]
    assert latest > stopped_at

    # SIGUSR1 works the same; then resume to the end
    proc = _start(cfg_path, run, cache_dir)
    wait_for(lambda: len(train_rows(run)) >= latest + 2, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 0 and (run / "REQUEUE").exists()
    proc = _start(cfg_path, run, cache_dir)
    assert proc.wait(timeout=120) == 0
    assert (run / "DONE").exists() and not (run / "REQUEUE").exists()
    assert [r["step"] for r in train_rows(run)] == list(range(1, 61))


def test_cli_exit_codes(tmp_path, tiny_dict, cache_dir):
    bad = write_config(tmp_path / "bad.yaml", {**tiny_dict, "model": {**tiny_dict["model"], "n_heads": 3}})
    out = subprocess.run([sys.executable, "-m", "train", str(bad), "--run-dir", str(tmp_path / "x")],
                         cwd=REPO, env=subprocess_env(cache_dir), capture_output=True, text=True)
    assert out.returncode == 2 and "model.n_heads" in out.stderr
    assert not (tmp_path / "x").exists()


def test_stop_before_the_first_step_then_resume_is_exact(finished_run, tmp_path, tiny_dict, monkeypatch):
    from train.trainer import StopRequest
    run = tmp_path / "early"
    with monkeypatch.context() as m:       # a stop request that is already there at the first boundary
        m.setattr(StopRequest, "requested", lambda self: True)
        result = train(make_cfg(tiny_dict), run)
    assert result.status == "requeue" and result.step == 0
    assert (run / "checkpoints" / "step-00000000" / "COMPLETE").exists()
    result = train(make_cfg(tiny_dict), run)
    assert result.status == "done"
    assert losses(run) == losses(finished_run)


def test_metrics_are_strict_json_with_nonfinite_values(tmp_path, tiny_dict):
    import json
    run = tmp_path / "json"
    cfg = make_cfg(tiny_dict, train__steps=3, checkpoint__every=0)
    train(cfg, run, callbacks=with_nan(cfg, {2}))

    def refuse(name):
        raise ValueError(f"non-JSON constant {name}")

    rows = [json.loads(line, parse_constant=refuse) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows if r["kind"] == "train"][1] is None


def test_branch_from_takes_the_full_state(finished_run, tmp_path, tiny_dict):
    run = tmp_path / "branch"
    step4 = finished_run / "checkpoints" / "step-00000004"
    train(make_cfg(tiny_dict, branch_from=str(step4)), run)
    assert losses(run) == {s: v for s, v in losses(finished_run).items() if s > 4}
    assert [e["event"] for e in train_rows(run, "event")][0] == "branch_from"
