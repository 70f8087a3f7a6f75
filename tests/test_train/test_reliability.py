"""Reliability: one process per run dir, stop signals from the first instant, damaged checkpoints
fall back (checksums catch flipped bytes), and a diverged run ends FAILED, not DONE."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from ablate_testing import REPO, copy_run, make_cfg, subprocess_env, train_rows, with_nan

from models.registry import ConfigError
from train import checkpoint as ckpt
from train.runlock import RunLock
from train.trainer import train


def _train_cmd(cfg_path, run, *extra):
    return [sys.executable, "-m", "train", str(cfg_path), *extra, "--run-dir", str(run)]


def test_second_trainer_on_a_run_dir_is_refused(tiny_dict, cache_dir, tmp_path):
    """A real second process while the run dir is locked: exit 2 naming the holder; a lock left by
    a dead process (the file alone, no flock) is taken over."""
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump({**tiny_dict, "train": {**tiny_dict["train"], "steps": 2}}))
    run = tmp_path / "run"
    holder = RunLock(run)
    holder.acquire()
    try:
        proc = subprocess.run(_train_cmd(cfg_path, run), cwd=REPO, env=subprocess_env(cache_dir),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"is in use by pid {os.getpid()} on host" in proc.stderr
        with pytest.raises(ConfigError, match="in use by pid"):      # and in process, same message
            train(make_cfg(tiny_dict, train__steps=2), run)
        assert sorted(p.name for p in run.iterdir()) == [".lock"]    # nothing else was written
    finally:
        holder.release()
    (run / ".lock").write_text("deadhost:999999\n")                  # stale: nobody holds the flock
    assert train(make_cfg(tiny_dict, train__steps=2, checkpoint__every=0), run).status == "done"


def test_failed_setup_leaves_no_run_dir(tiny_dict, tmp_path):
    """The lock made the run dir; a setup error (here at model build, after the data) removes it."""
    run = tmp_path / "never"
    cfg = make_cfg(tiny_dict, parallel__backend="fsdp2", parallel__cpu_offload=True)
    with pytest.raises(ConfigError) as e:
        train(cfg, run)
    assert e.value.key == "parallel.cpu_offload" and not run.exists()


def test_sigterm_right_after_launch_requeues(tiny_dict, cache_dir, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict))
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(cfg_path, run), cwd=REPO, env=subprocess_env(cache_dir),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)                                  # still importing torch
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert (run / "REQUEUE").exists() and not (run / "DONE").exists()
    assert "stopped at step 0" in out


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_damaged_newest_checkpoint_falls_back(finished_run, tiny_dict, tmp_path):
    """A flipped byte in the newest checkpoint's shard: the checksum catches it, the run resumes
    from the one before (logged, naming the file) and reproduces the original losses exactly."""
    run = copy_run(finished_run, tmp_path / "run")
    newest = ckpt.latest_checkpoint(run / "checkpoints")[1]
    shard = next(p for p in newest.iterdir() if p.suffix == ".distcp")
    _flip_a_byte(shard)
    (run / "DONE").unlink()
    assert train(make_cfg(tiny_dict), run).status == "done"
    [event] = [e for e in train_rows(run, "event") if e["event"] == "checkpoint_unusable"]
    assert str(newest) == event["checkpoint"] and shard.name in event["error"] and "checksum" in event["error"]
    resumed = [e for e in train_rows(run, "event") if e["event"] == "resume"][-1]
    assert resumed["step"] == 8
    original = {r["step"]: r["loss"] for r in train_rows(finished_run)}
    assert all(r["loss"] == original[r["step"]] for r in train_rows(run) if 8 < r["step"] <= 12)


def test_no_loadable_checkpoint_is_one_line_exit_1(finished_run, tiny_dict, tmp_path, capsys):
    from train.cli import main
    run = copy_run(finished_run, tmp_path / "run")
    for _, path in ckpt.complete_checkpoints(run / "checkpoints"):
        (path / ckpt.TRAINER_STATE).write_bytes(b"scribbled")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", str(cfg_path), "train.steps=14", "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ablate: error: no checkpoint of") and "trainer_state.pt" in err[0]


def test_diverged_run_fails_and_skips_are_reported(tiny_dict, tmp_path):
    run = tmp_path / "diverged"
    cfg = make_cfg(tiny_dict, train__steps=12, checkpoint__every=0, train__max_skipped_steps=3)
    with pytest.raises(FloatingPointError, match="diverged: 3 consecutive"):
        train(cfg, run, callbacks=with_nan(cfg, set(range(2, 13))))
    assert (run / "FAILED").exists() and not (run / "DONE").exists()
    run = tmp_path / "one_skip"
    cfg = make_cfg(tiny_dict, train__steps=4, checkpoint__every=0)
    result = train(cfg, run, callbacks=with_nan(cfg, {2}))
    assert result.status == "done" and result.skipped_steps == 1
    assert "1 non-finite steps skipped" in (run / "DONE").read_text()


def test_eval_refuses_a_run_dir_in_use(finished_run, tmp_path):
    pytest.importorskip("lm_eval")
    from eval.runner import EvalSpec, evaluate_run
    run = copy_run(finished_run, tmp_path / "run")
    holder = RunLock(run)
    holder.acquire()
    try:
        with pytest.raises(ConfigError, match="in use by pid"):
            evaluate_run(run, "latest", EvalSpec(["ablate_val_ppl"], limit=1))
    finally:
        holder.release()


def test_odd_run_dir_states(finished_run, tiny_dict, tmp_path, capsys):
    from train.cli import main
    # metrics lines that are JSON but not rows are set aside, not a crash
    run = copy_run(finished_run, tmp_path / "rows")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('[1, 2]\n{"kind": "train", "step": "x"}\n')
    (run / "DONE").unlink()
    assert train(make_cfg(tiny_dict, train__steps=13), run).status == "done"
    assert "[1, 2]" in (run / "metrics.unreadable.jsonl").read_text()
    # a damaged config.yaml: exit 2 naming it
    bad = copy_run(finished_run, tmp_path / "bad")
    (bad / "config.yaml").write_text("- just\n- a list\n")
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_dict))
    assert main(["train", str(cfg_path), "--run-dir", str(bad)]) == 2
    assert "config.yaml is damaged" in capsys.readouterr().err
    # train.steps below the run's step: refused, nothing rewritten
    before = (run / "config.yaml").read_text()
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, train__steps=5), run)
    assert e.value.key == "train.steps" and (run / "config.yaml").read_text() == before
    assert not (run / "FAILED").exists()
    # checkpoints gone, metrics left: starts over with a warning, a restart event, the old rows kept
    gone = copy_run(finished_run, tmp_path / "gone")
    import shutil
    shutil.rmtree(gone / "checkpoints")
    assert train(make_cfg(tiny_dict, train__steps=2, checkpoint__every=0), gone).status == "done"
    assert "starting over from step 0" in capsys.readouterr().err
    assert [e["previous_last_step"] for e in train_rows(gone, "event") if e["event"] == "restart"] == [12]
    assert (gone / "metrics.before-restart.jsonl").exists()
    # generate --step abc: exit 2 naming --step
    assert main(["generate", str(finished_run), "--step", "abc", "--max-new-tokens", "1"]) == 2
    assert "--step" in capsys.readouterr().err


def test_deleted_config_yaml_still_guards_the_resume(finished_run, tiny_dict, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    (run / "config.yaml").unlink()
    (run / "DONE").unlink()
    with pytest.raises(ConfigError) as e:                      # the checkpoint's own copy catches it
        train(make_cfg(tiny_dict, model__d_model=64), run)
    assert "model.d_model" in str(e.value)
    assert train(make_cfg(tiny_dict, train__steps=13), run).status == "done"
    assert (run / "config.yaml").exists()


def test_a_run_dir_that_is_a_file_is_refused_before_any_work(tiny_dict, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a run dir")
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict), path)
    assert e.value.key == "--run-dir" and "not a directory" in e.value.message


def test_a_full_disk_names_the_checkpoint_it_was_writing(tiny_dict, tmp_path, monkeypatch):
    import errno

    import torch.distributed.checkpoint.filesystem as fs

    def full(self, plan, planner):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fs.FileSystemWriter, "write_data", full)
    run = tmp_path / "run"
    with pytest.raises(ckpt.CheckpointWriteError, match=r"could not write checkpoint .*\.tmp-step-00000002"):
        train(make_cfg(tiny_dict, train__steps=3, checkpoint__every=2), run)
    assert "No space left on device" in (run / "FAILED").read_text() and ".tmp-step-00000002" in (run / "FAILED").read_text()
