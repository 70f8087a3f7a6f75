"""Single-process checks of parallel options and the loss-spike detector."""
from __future__ import annotations

import pytest
from ablate_testing import make_cfg, train_rows

from models.registry import ConfigError
from train.trainer import SpikeDetector, train


def test_activation_checkpointing_gives_identical_losses(finished_run, tmp_path, tiny_dict):
    for mode in ("full", "every_k"):
        run = tmp_path / mode
        train(make_cfg(tiny_dict, parallel__activation_checkpointing=mode, parallel__ac_every=2,
                       checkpoint__every=0), run)
        assert [r["loss"] for r in train_rows(run)] == [r["loss"] for r in train_rows(finished_run)]


def test_selective_is_refused_with_a_hint(tiny_dict):
    with pytest.raises(ConfigError) as e:
        make_cfg(tiny_dict, parallel__activation_checkpointing="selective")
    assert e.value.key == "parallel.activation_checkpointing" and "every_k" in e.value.message


def test_single_process_fsdp2_matches_plain(finished_run, tmp_path, tiny_dict):
    run = tmp_path / "fsdp"
    train(make_cfg(tiny_dict, parallel__backend="fsdp2", checkpoint__every=0), run)
    for a, b in zip(train_rows(run), train_rows(finished_run)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


def test_spike_detector():
    d = SpikeDetector(window=5, sigma=3.0)
    for x in (2.0, 2.1, 1.9, 2.0, 2.05):
        assert not d.is_spike(x)
        d.update(x)
    assert d.is_spike(3.0) and not d.is_spike(2.1)
    assert not SpikeDetector(window=0, sigma=3.0).is_spike(100.0)


def test_spike_skip_leaves_a_skip_event(tmp_path, tiny_dict, monkeypatch):
    # the detector's statistics are tested above; here: the loop skips the step it flags
    monkeypatch.setattr(SpikeDetector, "is_spike", lambda self, loss: len(self.history) == 3)
    run = tmp_path / "spike"
    train(make_cfg(tiny_dict, train__spike_window=3, train__spike_action="skip", checkpoint__every=0,
                   train__steps=6), run)
    spikes = [e for e in train_rows(run, "event") if e["event"] == "spike"]
    assert [(e["step"], e["skipped"]) for e in spikes] == [(4, True), (5, True), (6, True)]


def test_parallel_validation_errors(tiny_dict):
    with pytest.raises(ConfigError) as e:
        make_cfg(tiny_dict, parallel__replicate=2)
    assert e.value.key == "parallel.replicate"
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, train__global_batch=6, train__micro_batch=4), "/nonexistent")
    assert e.value.key == "train.global_batch"


def test_cpu_offload_needs_cuda(tmp_path, tiny_dict):
    with pytest.raises(ConfigError) as e:
        train(make_cfg(tiny_dict, parallel__backend="fsdp2", parallel__cpu_offload=True), tmp_path / "off")
    assert e.value.key == "parallel.cpu_offload"
    assert not (tmp_path / "off").exists()
