"""The data-source contract seen from the trainer (a synthetic source with its own vocabulary, a
label mask and a validation metric), several validation sets, the prefetch order, the console,
time across resume, provenance and the `model` event. One short run and its resume."""
from __future__ import annotations

import contextlib
import io
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import pytest
import torch
import yaml
from ablate_testing import make_cfg, train_rows

from models.loss import IGNORE_INDEX
from models.registry import ConfigError
from train.data import DataError, DataSource, prepare_data, prepare_val_sets
from train.data.source import SOURCES

VOCAB = 40


@dataclass
class RecallConfig:
    """`data.test_recall`: the test source's keys."""

    offset: int = 0        # added to every value token (a second validation set differs by it)


class RecallSamples:
    """Sample i: n random tokens then the same n again; only the repeat is a target, so a model
    that learns to copy gets accuracy 1. Every requested batch is recorded (prefetch order)."""

    def __init__(self, seq_len: int, seed: int, offset: int, n: int | None = None, log: list | None = None):
        self.seq_len, self.seed, self.offset, self.n = seq_len, seed, offset, n
        self.requests = log if log is not None else []

    def __len__(self) -> int:
        return self.n if self.n is not None else 1 << 40

    def batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        self.requests.append(int(indices[0]))
        half = (self.seq_len + 1) // 2
        rows = []
        for i in indices.tolist():
            x = np.random.default_rng([self.seed, i]).integers(2, VOCAB - 5, half) + self.offset
            rows.append(np.concatenate([x, x])[: self.seq_len + 1])
        w = torch.from_numpy(np.stack(rows)).long()
        labels = w[:, 1:].clone()
        labels[:, : half - 1] = IGNORE_INDEX               # no loss before the repeat starts
        return {"input_ids": w[:, :-1].contiguous(), "labels": labels,
                "doc_ids": torch.zeros_like(labels), "indices": torch.from_numpy(indices.astype(np.int64))}


class RecallData:
    vocab_size, tokenizer_dir, eos_id, pad_id, tokenizer = VOCAB, None, None, None, None
    val_metric_names = ("acc",)

    def __init__(self, offset: int, requests: list):
        self.offset, self.requests = offset, requests
        self.cache_key = f"test_recall-{offset}"

    def train_samples(self, seq_len: int, seed: int) -> RecallSamples:
        return RecallSamples(seq_len, seed, self.offset, log=self.requests)

    def val_samples(self, seq_len: int) -> RecallSamples:
        return RecallSamples(seq_len, 10_000, self.offset, n=16)

    def val_metrics(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> dict[str, tuple[float, int]]:
        mask = batch["labels"] != IGNORE_INDEX
        hits = (logits.argmax(-1).cpu() == batch["labels"]) & mask
        return {"acc": (float(hits.sum()), int(mask.sum()))}

    def summary(self) -> dict[str, Any]:
        return {"cache": self.cache_key}


REQUESTS: list[int] = []


class Recall(DataSource):
    def vocab_size(self, dcfg: Any) -> int:
        return VOCAB

    def prepare(self, ctx: Any, dcfg: Any, key: str) -> RecallData:
        return RecallData(dcfg.test_recall.offset, REQUESTS if ctx.role == "train" else [])


@contextlib.contextmanager
def recall_source() -> Iterator[None]:
    SOURCES.register("test_recall", config=RecallConfig)(Recall)
    try:
        yield
    finally:
        del SOURCES._items["test_recall"]
        del SOURCES._configs["test_recall"]


@pytest.fixture(scope="module")
def recall_run(tmp_path_factory, tiny_dict) -> Any:
    """6 steps on the synthetic source with a second validation set, lm-eval due at step 4 and
    the console on (stdout is not a terminal here), every train_step checking that the next
    step's batch was requested before it returns; then config.yaml's code version is replaced
    by a fake 'first segment' one and the run is extended to 8 steps."""
    from train.cli import run_callbacks
    from train.trainer import Trainer, train

    run_dir = tmp_path_factory.mktemp("recall") / "run"
    overrides = dict(data__source="test_recall", data__val_sets={"shifted": {"source": "test_recall",
                                                                             "test_recall": {"offset": 4}}},
                     train__steps=6, train__log_every=2, train__val_every=3, train__progress=True, train__probe_every=3,
                     eval__every=4, eval__tasks=["ablate_val_ppl"])
    late: list[int] = []
    original = Trainer.train_step

    def checked(self, batches):
        metrics = original(self, batches)
        nxt = int(batches[-1]["indices"][-1]) + 1
        for _ in range(1000):                 # the prefetch thread asks within a moment, or never
            if nxt in REQUESTS:
                break
            threading.Event().wait(0.01)
        else:
            late.append(self.state.step)
        return metrics

    out = io.StringIO()
    with recall_source(), pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(Trainer, "train_step", checked)
        cfg = make_cfg(tiny_dict, **overrides)
        first = train(cfg, run_dir, callbacks=run_callbacks(cfg))
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        saved["code_version"] = {"git_sha": "first-segment", "dirty": False}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
        cfg = make_cfg(tiny_dict, **{**overrides, "train__steps": 8})
        second = train(cfg, run_dir, callbacks=run_callbacks(cfg))
    return {"dir": run_dir, "first": first, "second": second, "late": late, "stdout": out.getvalue()}


def test_batch_k_plus_1_is_requested_before_train_step_k_returns(recall_run):
    assert recall_run["first"].status == "done" and recall_run["second"].status == "done"
    assert recall_run["late"] == []


def test_every_validation_set_gets_rows_with_the_sources_metric(recall_run):
    rows = train_rows(recall_run["dir"], "val")
    assert [(r["step"], r["set"]) for r in rows] == [(s, name) for s in (3, 6, 8) for name in ("heldout", "shifted")]
    for r in rows:
        assert 0.0 <= r["val_acc"] <= 1.0 and np.isfinite(r["val_loss"])
    # the sets are different data: the same model scores them differently
    assert rows[-1]["val_loss"] != rows[-2]["val_loss"]
    assert recall_run["second"].val_loss == rows[-2]["val_loss"]        # the first set's


def test_a_run_without_tokenizer_skips_lm_eval_with_a_reason(recall_run):
    skipped = [e for e in train_rows(recall_run["dir"], "event") if e["event"] == "eval_skipped"]
    assert [e["step"] for e in skipped] == [4, 6, 8] and "no tokenizer" in skipped[0]["reason"]
    assert not (recall_run["dir"] / "tokenizer").exists()


def test_entropy_probe_rows_every_probe_every_steps(recall_run):
    rows = [r for r in train_rows(recall_run["dir"], "probe") if r["probe"] == "entropy"]
    assert sorted({r["step"] for r in rows}) == [3, 6]
    assert {(r["layer"], r["head"]) for r in rows if r["step"] == 3} == {(0, 0), (0, 1), (1, 0), (1, 1)}
    assert all(0 <= r["value"] <= r["max"] + 1e-6 for r in rows)


def test_model_event_at_each_segment_start(recall_run):
    events = [e for e in train_rows(recall_run["dir"], "event") if e["event"] == "model"]
    assert [e["step"] for e in events] == [0, 6]
    e = events[0]
    p = e["params"]
    assert p["total"] == p["embedding"] + p["non_embedding"] and p["memory_values"] == 0 and p["matmul"] > 0
    assert e["flops_per_token"] > 6 * p["matmul"] and e["seq_len"] == 32 and e["world_size"] == 1
    assert (e["param_kind"], e["device"], e["dtype"]) == ("sp", "cpu", "fp32")
    assert isinstance(e["cpu_threads"], int) and e["cpu_threads"] >= 1
    assert e["layers"] == [{"layer": i, "mixer": "attention", "kernel": "sdpa_causal", "ffn": "glu/swiglu"}
                           for i in range(2)]


def test_time_continues_across_resume_and_the_window_times_are_reported(recall_run):
    rows = train_rows(recall_run["dir"])
    times = [r["time_s"] for r in rows]
    assert times == sorted(times) and len(rows) == 4          # steps 2, 4, 6, then 8 after the resume
    assert all({"val_s", "eval_s", "ckpt_s"} <= set(r) for r in rows)
    # a window's time outside the steps is reported by the next train row: validation at step 3 by
    # step 4's, the checkpoint at step 4 (checkpoint.every) by step 6's
    assert rows[0]["val_s"] == 0 and rows[1]["val_s"] > 0 and rows[2]["ckpt_s"] > 0


def test_config_keeps_the_first_code_version_and_resume_records_its_own(recall_run):
    saved = yaml.safe_load((recall_run["dir"] / "config.yaml").read_text())
    assert saved["code_version"]["git_sha"] == "first-segment"
    resume = [e for e in train_rows(recall_run["dir"], "event") if e["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["code_version"]["git_sha"] != "first-segment"


def test_console_prints_plain_lines_and_every_validation(recall_run):
    out = recall_run["stdout"]
    assert "\r" not in out
    assert "step 2/6 | loss " in out and " tok/s | mem " in out
    assert "val step 3 [heldout]: loss " in out and "val step 3 [shifted]: loss " in out and "val_acc" in out


def test_console_is_silent_when_progress_is_off():
    from train.console import Console
    out = io.StringIO()
    c = Console(False, 10, 0, out=out)
    c.train_row({"step": 1, "loss": 1.0, "lr": 1e-3, "tokens_per_s": 1.0, "mfu": None, "mem_gb": 0.1})
    c.val_row({"step": 1, "set": "heldout", "val_loss": 1.0, "val_ppl": 2.7})
    c.close()
    assert out.getvalue() == ""


def test_text_validation_set_needs_the_runs_tokenizer(tiny_dict):
    with recall_source():
        cfg = make_cfg(tiny_dict, data__source="test_recall", data__val_sets={"text": {"source": "embedded"}})
        data = prepare_data(cfg, progress=False)
        with pytest.raises(DataError, match="needs the run's tokenizer") as e:
            prepare_val_sets(cfg, data, progress=False)
    assert e.value.key == "data.val_sets.text.source"


def test_text_validation_set_is_tokenized_whole_with_the_runs_tokenizer(tiny_dict, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("def f(x):\n    return x + 1\n" * 40)
    cfg = make_cfg(tiny_dict, data__val_sets={"notes": {"source": "files", "paths": [str(notes)]}})
    data = prepare_data(cfg, progress=False)
    sets = prepare_val_sets(cfg, data, progress=False)
    assert list(sets) == ["heldout", "notes"] and sets["heldout"] is data
    notes_set = sets["notes"]
    assert notes_set.tokenizer.sha256 == data.tokenizer.sha256 and len(notes_set.train) == 0
    ids = data.tokenizer.backend().encode(notes.read_text()).ids
    assert np.asarray(notes_set.val.tokens).tolist() == [data.eos_id, *ids]


@pytest.mark.parametrize("val_sets, key", [
    ({"heldout": {"source": "embedded"}}, "data.val_sets.heldout"),
    ({"x": {"source": "embedded", "seq_len": 16}}, "data.val_sets.x.seq_len"),
    ({"x": {"source": "embedded", "val_fraction": 0.5}}, "data.val_sets.x.val_fraction"),
    ({"x": {"source": "nowhere"}}, "data.val_sets.x.source"),
])
def test_bad_validation_sets_name_the_key(tiny_dict, val_sets, key):
    with pytest.raises(ConfigError) as e:
        make_cfg(tiny_dict, data__val_sets=val_sets)
    assert e.value.key == key


def test_moved_and_unmixable_keys_name_the_key(tiny_dict):
    with pytest.raises(ConfigError, match="moved: write data.pretokenized.vocab_size") as e:
        make_cfg(tiny_dict, data__vocab_size=100)
    assert e.value.key == "data.vocab_size"
    mix = [{"weight": 1, "source": "pretokenized", "paths": ["x.bin"], "pretokenized": {"vocab_size": 9}}]
    with pytest.raises(ConfigError, match="cannot be mixed") as e:
        make_cfg(tiny_dict, data__source="mixture", data__mixture=mix)
    assert e.value.key == "data.mixture[0].source"
