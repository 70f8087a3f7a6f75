"""`ablate compare` on fabricated run dirs (config.yaml and metrics.jsonl written by hand, no
training): grouping into arms, the statistics against hand-computed values, the report's
warnings, the self-contained HTML, the grid plots and the CLI's errors."""
from __future__ import annotations

import base64
import copy
import json
import math
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

pytest.importorskip("scipy", reason="the plots extra is not installed (pip install -e '.[plots]')")
pytest.importorskip("matplotlib", reason="the plots extra is not installed (pip install -e '.[plots]')")

from eval.compare import stats  # noqa: E402
from eval.compare.arms import group  # noqa: E402
from eval.compare.report import build  # noqa: E402
from eval.compare.runs import Run  # noqa: E402
from train.cli import main  # noqa: E402

T975_DF2 = 4.302652729911275          # t_{0.975} with 2 degrees of freedom
BASE = {
    "seed": 0, "name": "fab", "device": "cpu",
    "model": {"d_model": 32, "n_layers": 2, "ffn": {"kind": "glu", "stochastic": {"seed": None}}},
    "data": {"source": "embedded", "seq_len": 16, "seed": 0, "cache_dir": "/tmp/cache", "num_proc": 1},
    "train": {"steps": 10, "global_batch": 4, "micro_batch": 4, "log_every": 5, "val_every": 5, "val_batches": 2,
              "progress": False},
    "optim": {"lr": 0.003, "schedule": {"kind": "cosine", "decay_frac": 0.2}},
    "checkpoint": {"every": 0, "keep_last": 2}, "parallel": {"backend": "none"}, "eval": {"every": 0},
    "log": {"tensorboard": False}, "launch": {"setup": []},
}
TPS = 4 * 16                                       # tokens per step of BASE


def _set(cfg: dict, key: str, value) -> None:
    *head, last = key.split(".")
    for k in head:
        cfg = cfg.setdefault(k, {})
    cfg[last] = value


def make_run(path: Path, val: dict[int, float], *, seed: int = 0, overrides: dict | None = None, done: bool = True,
             derived: dict | None = None, evals: list[dict] | None = None, extra_rows: list[dict] | None = None,
             flops: float = 1.0e6, time_per_step: float = 1.0) -> Path:
    """A run dir: config.yaml (BASE + overrides, `seed`), a `model` event, a train and a heldout val
    row at every step of `val` ({step: val_loss}; train loss = val_loss + 0.1), and DONE."""
    cfg = copy.deepcopy(BASE)
    cfg["seed"] = seed
    for k, v in (overrides or {}).items():
        _set(cfg, k, v)
    cfg["derived"] = {"model.vocab_size": "tokenizer", **(derived or {})}
    cfg["code_version"] = {"git_sha": None, "dirty": None}
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    tps = cfg["train"]["global_batch"] * cfg["data"]["seq_len"]
    rows = [{"kind": "event", "event": "model", "step": 0, "params": {"total": 45000, "embedding": 12000,
             "non_embedding": 33000, "matmul": 44000, "memory_values": 0}, "flops_per_token": flops, "seq_len": 16}]
    for step, v in sorted(val.items()):
        rows.append({"kind": "train", "step": step, "tokens": step * tps, "loss": v + 0.1, "mfu": None,
                     "tokens_per_s": 1000.0 + step, "mem_gb": 0.5, "time_s": step * time_per_step})
        rows.append({"kind": "val", "step": step, "tokens": step * tps, "set": "heldout", "val_loss": v,
                     "val_ppl": math.exp(v)})
    rows += evals or []
    rows += extra_rows or []
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (path / "DONE").write_text(f"step {max(val)}, 0 non-finite steps skipped\n")
    return path


def make_sweep(root: Path, arms: dict[str, dict], runs: list[tuple[str, dict, int, dict]],
               grid: dict | None = None, vary_data_seed: bool = False, **kw) -> Path:
    """A sweep dir: manifest.json and a run dir per (arm, grid cell, seed, val) in `runs`."""
    entries = []
    for arm, cell, seed, val in runs:
        d = arm + "".join(f"__{k.split('.')[-1]}={v}" for k, v in cell.items()) + f"__s{seed}"   # as `ablate sweep`
        over = {**arms[arm], **cell}
        if vary_data_seed:
            over["data.seed"] = seed
        make_run(root / d, val, seed=seed, overrides=over, **kw)
        entries.append({"dir": d, "arm": arm, "grid": cell, "seed": seed})
    manifest = {"name": root.name, "base": "configs/base/tiny.yaml", "seeds": sorted({r[2] for r in runs}),
                "vary_data_seed": vary_data_seed, "arms": arms, "grid": grid or {}, "runs": entries}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


A_FINAL, B_FINAL = [3.0, 3.2, 3.1], [2.9, 3.0, 3.05]


@pytest.fixture
def sweep(tmp_path) -> Path:
    """baseline and variant (optim.lr), seeds 0-2, val at steps 5 and 10."""
    runs = [("baseline", {}, s, {5: 4.0 + s / 10, 10: A_FINAL[s]}) for s in range(3)]
    runs += [("lowlr", {}, s, {5: 3.9 + s / 10, 10: B_FINAL[s]}) for s in range(3)]
    return make_sweep(tmp_path / "sw", {"baseline": {}, "lowlr": {"optim.lr": 0.001}}, runs)


# ----------------------------------------------------------------------------- statistics
def test_stats_against_hand_computed_values():
    s = stats.summarize(A_FINAL)
    assert s["n"] == 3 and s["mean"] == pytest.approx(3.1)
    assert s["sem"] == pytest.approx(0.1 / math.sqrt(3))                       # sd 0.1
    assert s["ci95"] == pytest.approx([3.1 - T975_DF2 * 0.1 / math.sqrt(3), 3.1 + T975_DF2 * 0.1 / math.sqrt(3)])
    one = stats.summarize([2.5, None, float("nan")])
    assert one["n"] == 1 and one["mean"] == 2.5 and one["sem"] is None and one["ci95"] is None

    d = [b - a for a, b in zip(A_FINAL, B_FINAL)]                                # -0.1, -0.2, -0.05
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t = mean / (sd / math.sqrt(3))
    p = stats.paired(dict(enumerate(B_FINAL)), dict(enumerate(A_FINAL)))
    assert p["n"] == 3 and p["diff"] == pytest.approx(mean) and p["sem"] == pytest.approx(sd / math.sqrt(3))
    assert p["t"] == pytest.approx(t)
    assert p["p"] == pytest.approx(1 - abs(t) / math.sqrt(t * t + 2))          # the t(2) two-sided tail, exact
    assert p["ci95"] == pytest.approx([mean - T975_DF2 * sd / math.sqrt(3), mean + T975_DF2 * sd / math.sqrt(3)])
    assert stats.paired({0: 1.0}, {0: 2.0}) is None                              # one shared seed: no test

    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0]
    va, vb = (5 / 3) / 4, 2.0 / 2                                                 # s^2 / n
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1)
    w = stats.welch(a, b)
    assert w["diff"] == pytest.approx(2.5 - 3.0) and w["sem"] == pytest.approx(math.sqrt(va + vb))
    assert w["df"] == pytest.approx(df)
    from scipy.stats import t as tdist
    assert w["p"] == pytest.approx(2 * tdist.sf(0.5 / math.sqrt(va + vb), df))
    assert stats.welch([1.0], [1.0, 2.0]) is None

    assert stats.wilcoxon_min_p(3) == 0.25 and stats.wilcoxon_min_p(6) < 0.05 < stats.wilcoxon_min_p(5)
    assert "0.25" in stats.rank_test_note(3) and stats.rank_test_note(6) is None


def test_report_numbers_and_files(sweep):
    assert main(["compare", str(sweep)]) == 0
    assert main(["compare", str(sweep), "--format", "json"]) == 0
    data = json.loads((sweep / "report" / "report.json").read_text())
    assert data["baseline"] == "baseline" and list(data["arms"]) == ["baseline", "lowlr"]
    base, low = data["arms"]["baseline"], data["arms"]["lowlr"]
    assert base["metric"]["mean"] == pytest.approx(3.1) and base["metric"]["sem"] == pytest.approx(0.1 / math.sqrt(3))
    assert low["metric"]["values"] == pytest.approx(B_FINAL)
    assert base["val"]["heldout"]["val_ppl"]["mean"] == pytest.approx(sum(map(math.exp, A_FINAL)) / 3)
    assert base["model"]["params"]["mean"] == 45000 and base["model"]["tokens_per_s"]["mean"] == pytest.approx(1010)
    (cmp,) = data["comparisons"]
    d = [b - a for a, b in zip(A_FINAL, B_FINAL)]
    assert cmp["arm"] == "lowlr" and cmp["method"] == "paired" and cmp["shared_seeds"] == 3
    assert cmp["diff"] == pytest.approx(sum(d) / 3) and cmp["paired"]["diff"] == pytest.approx(sum(d) / 3)
    assert cmp["welch"]["diff"] == pytest.approx(sum(d) / 3)
    assert any("rank test cannot reach p < 0.05" in n and "0.25" in n for n in cmp["notes"])
    assert cmp["better"] is None                                    # the t(2) interval includes 0
    assert data["messages"] == []                                   # nothing to warn about
    md = (sweep / "report" / "report.md").read_text()
    assert "| lowlr | baseline |" in md and "loss_vs_tokens.png" in md and "± " in md
    for png in ("loss_vs_tokens.png", "loss_vs_time.png"):
        assert (sweep / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_at_step_and_tokens_pick_the_row_at_or_before(sweep):
    for at in ("step=7", f"tokens={7 * TPS}"):
        c = build([sweep], at=at)
        assert c.data["arms"]["baseline"]["metric"]["mean"] == pytest.approx(4.1)      # the step-5 rows
        assert {r["step"] for r in c.data["arms"]["baseline"]["runs"]} == {5}
    assert build([sweep], at="step=10").data["arms"]["baseline"]["metric"]["mean"] == pytest.approx(3.1)


def test_an_arm_with_identical_seeds_is_tested_without_scipy_warnings():
    """Both seeds at the same accuracy (its variance exactly 0): scipy's precision-loss warning
    is noise there, and the numbers are Welch's with that side's variance 0."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        w = stats.welch([0.9971, 0.9976], [0.1265, 0.1265])
        p = stats.paired({0: 0.9971, 1: 0.9976}, {0: 0.1265, 1: 0.1265})
    assert w["sem"] == pytest.approx(0.00025) and w["df"] == pytest.approx(1.0) and w["p"] < 0.001
    assert p["diff"] == pytest.approx(0.87085) and p["p"] == pytest.approx(w["p"])


# ----------------------------------------------------------------------------- grouping
def _arms(tmp_path, variants: list[tuple[dict, dict | None]], manifest: dict | None = None) -> int:
    """The number of arms for two seeds of BASE and one run per variant (overrides, derived)."""
    root = tmp_path / f"g{len(list(tmp_path.iterdir()))}"
    runs = [make_run(root / f"r{i}", {10: 3.0}, seed=i, derived=der, overrides=ov)
            for i, (ov, der) in enumerate([({}, None), ({}, None), *variants])]
    if manifest is not None:
        entries = [{"dir": r.name, "arm": "a", "grid": {}, "seed": i} for i, r in enumerate(runs)]
        (root / "manifest.json").write_text(json.dumps({**manifest, "arms": {"a": {}}, "runs": entries}))
    return len(group([Run.load(r) for r in runs]))


IGNORED = {"name": "other", "data.cache_dir": "/elsewhere", "data.num_proc": 8, "train.log_every": 1,
           "train.val_every": 2, "checkpoint.every": 5, "checkpoint.keep_last": 9, "eval.every": 3,
           "log.tensorboard": True, "parallel.backend": "fsdp2", "parallel.compile": True, "launch.setup": ["x"]}
NOT_IGNORED = {"train.steps": 20, "optim.lr": 0.01, "train.val_batches": 4, "data.seed": 1,
               "optim.schedule.decay_frac": 0.5, "train.global_batch": 8, "model.ffn.stochastic.seed": 3,
               "train.micro_batch": 2, "train.progress": True, "device": "cuda"}


@pytest.mark.parametrize("key", sorted(IGNORED))
def test_grouping_ignores_operational_keys(tmp_path, key):
    assert _arms(tmp_path, [({key: IGNORED[key]}, None)]) == 1


@pytest.mark.parametrize("key", sorted(NOT_IGNORED))
def test_grouping_separates_every_other_key(tmp_path, key):
    assert _arms(tmp_path, [({key: NOT_IGNORED[key]}, None)]) == 2


def test_grouping_seed_derived_keys_and_vary_data_seed(tmp_path):
    # the seed itself differs in every pair above; a key derived from it is ignored too
    derived = {"model.ffn.stochastic.seed": "seed"}
    assert _arms(tmp_path, [({"model.ffn.stochastic.seed": 7}, derived)]) == 2      # derived in that run only
    root = tmp_path / "der"
    runs = [make_run(root / f"r{i}", {10: 3.0}, seed=i, overrides={"model.ffn.stochastic.seed": i}, derived=derived)
            for i in range(3)]
    assert len(group([Run.load(r) for r in runs])) == 1
    # data.seed: ignored only when the sweep manifest varies it with the seed
    assert _arms(tmp_path, [({"data.seed": 5}, None)], manifest={"name": "s", "vary_data_seed": True}) == 1
    assert _arms(tmp_path, [({"data.seed": 5}, None)], manifest={"name": "s", "vary_data_seed": False}) == 2


def test_ad_hoc_arms_are_named_by_their_differing_keys(tmp_path):
    a = [make_run(tmp_path / f"a{s}", {10: 3.0 + s / 10}, seed=s) for s in range(2)]
    b = [make_run(tmp_path / f"b{s}", {10: 2.9 + s / 10}, seed=s, overrides={"optim.lr": 0.01, "model.n_layers": 4})
         for s in range(2)]
    c = build([*a, *b])
    assert list(c.data["arms"]) == ["n_layers=2,lr=0.003", "n_layers=4,lr=0.01"]
    assert c.data["baseline"] == "n_layers=2,lr=0.003"
    assert c.data["comparisons"][0]["diff"] == pytest.approx(-0.1)
    assert main(["compare", *map(str, a + b), "--format", "json"]) == 2                # several inputs need --out
    assert main(["compare", *map(str, a + b), "--out", str(tmp_path / "rep"), "--baseline", "n_layers=4,lr=0.01",
                 "--format", "json"]) == 0
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    (cmp,) = data["comparisons"]
    assert cmp["arm"] == "n_layers=2,lr=0.003" and cmp["diff"] == pytest.approx(0.1)


def test_arm_config_lists_the_keys_it_has_by_their_shortest_tails(tmp_path):
    """Arms with different mixer letters: each lists only its own letters' keys (no `=None` for a
    letter it lacks), each key by the shortest tail no other config key has."""
    attn = {"model.layers": {"pattern": "A", "mixers": {"A": {"kind": "attention", "window": None}}}}
    local = {"model.layers": {"pattern": "LA", "mixers": {"L": {"kind": "attention", "window": 3},
                                                          "A": {"kind": "attention", "window": None}}}}
    root = make_sweep(tmp_path / "mx", {"attn": attn, "local": local},
                      [(arm, {}, s, {10: 3.0 - s / 10}) for arm in ("attn", "local") for s in range(2)])
    data = build([root]).data
    assert data["arms"]["attn"]["differs"] == {"model.layers.pattern": "A"}
    assert data["arms"]["local"]["differs"] == {"model.layers.mixers.L.kind": "attention",
                                                "model.layers.mixers.L.window": 3, "model.layers.pattern": "LA"}
    assert main(["compare", str(root)]) == 0
    md = (root / "report" / "report.md").read_text()
    assert "| pattern=A |" in md and "| L.kind=attention, L.window=3, pattern=LA |" in md


# ----------------------------------------------------------------------------- warnings
def test_report_flags_unfinished_single_seed_budgets_and_missing_evals(tmp_path, capsys):
    ev = [{"kind": "eval", "step": 10, "task": "hellaswag", "metric": "acc", "value": v, "stderr": 0.01,
           "hash8": "aaaa1111"} for v in (0.30,)]
    runs = [("baseline", {}, 0, {5: 4.0, 10: 3.0}), ("baseline", {}, 1, {5: 4.1, 10: 3.1}),
            ("baseline", {}, 2, {5: 4.2}),                                             # unfinished: stopped at 5
            ("long", {}, 0, {10: 3.0, 20: 2.8}),                                       # single seed, 2x the budget
            ]
    root = make_sweep(tmp_path / "sw", {"baseline": {}, "long": {"train.steps": 20}}, runs)
    (root / "baseline__s2" / "DONE").unlink()
    (root / "baseline__s2" / "REQUEUE").write_text("stopped at step 5\n")
    with open(root / "baseline__s0" / "metrics.jsonl", "a") as f:                  # one baseline run has an eval
        f.write(json.dumps(ev[0]) + "\n")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["runs"].append({"dir": "long__s1", "arm": "long", "grid": {}, "seed": 1})     # not started yet
    (root / "manifest.json").write_text(json.dumps(manifest))

    assert main(["compare", str(root)]) == 0
    out = capsys.readouterr().out
    data = build([root]).data
    kinds = {m["kind"] for m in data["messages"]}
    assert {"unfinished", "single_seed", "token_budget", "missing_eval", "missing_run"} <= kinds
    text = "\n".join(m["text"] for m in data["messages"])
    assert "baseline__s2 is unfinished" in text and "step 5 of 10" in text
    assert "arm long has a single seed" in text
    assert "different token budgets" in text and "1,280" in text and "640" in text
    assert "2 of 3 runs lack hellaswag/acc [aaaa1111]" in text and "arm long has no hellaswag/acc" in text
    assert "long__s1 has no run dir yet" in text
    md = (root / "report" / "report.md").read_text()
    assert "## Warnings" in md and "single seed" in md and "unfinished" in md and "hellaswag" in md
    assert "warning: unfinished" in out
    (cmp,) = data["comparisons"]
    assert cmp["paired"] is None and cmp["welch"] is None and cmp["ci95"] is None
    assert any("single seed" in n for n in cmp["notes"])
    assert data["arms"]["baseline"]["eval"][0]["n"] == 1


def test_eval_settings_that_differ_between_arms_are_flagged(tmp_path):
    def ev(h, v):
        return [{"kind": "eval", "step": 10, "task": "arc_easy", "metric": "acc", "value": v, "stderr": None,
                 "hash8": h}]
    runs_a = [make_run(tmp_path / f"a{s}", {10: 3.0}, seed=s, evals=ev("aaaa1111", 0.4 + s / 100)) for s in range(2)]
    runs_b = [make_run(tmp_path / f"b{s}", {10: 3.0}, seed=s, overrides={"optim.lr": 0.01},
                       evals=ev("bbbb2222", 0.5)) for s in range(2)]
    for r, h, limit in ((runs_a[0], "aaaa1111", 100), (runs_b[0], "bbbb2222", None)):
        (r / "eval").mkdir()
        (r / "eval" / f"step-00000010.{h}.json").write_text(json.dumps(
            {"step": 10, "hash8": h, "settings": {"tasks": ["arc_easy"], "limit": limit, "num_fewshot": None}}))
    c = build([*runs_a, *runs_b])
    msgs = [m["text"] for m in c.messages if m["kind"] == "eval_settings"]
    assert len(msgs) == 1 and "arc_easy/acc" in msgs[0] and "differ in limit" in msgs[0]
    a = c.data["arms"]["lr=0.003"]["eval"][0]
    assert (a["hash8"], a["n"], a["mean"]) == ("aaaa1111", 2, pytest.approx(0.405))
    c = build([*runs_a, *runs_b], metric="arc_easy/acc")            # two hashes: the most common, with a note
    assert any(m["kind"] == "metric" for m in c.messages)


def test_unshared_seeds_use_welch_with_a_note(tmp_path):
    a = [make_run(tmp_path / f"a{s}", {10: v}, seed=s) for s, v in zip((0, 1, 2), (3.0, 3.2, 3.1))]
    b = [make_run(tmp_path / f"b{s}", {10: v}, seed=s, overrides={"optim.lr": 0.01})
         for s, v in zip((5, 6), (2.9, 3.0))]
    (cmp,) = build([*a, *b]).data["comparisons"]
    assert cmp["paired"] is None and cmp["method"] == "welch" and cmp["shared_seeds"] == 0
    assert cmp["ci95"] == pytest.approx(stats.welch([2.9, 3.0], [3.0, 3.2, 3.1])["ci95"])
    assert any("seeds not shared" in n for n in cmp["notes"])

    c = [make_run(tmp_path / f"c{s}", {10: v}, seed=s, overrides={"optim.lr": 0.03})
         for s, v in zip((0, 1, 7), (2.9, 3.0, 3.3))]                                   # seeds 0 and 1 shared
    (cmp,) = build([*a, *c]).data["comparisons"]
    assert cmp["method"] == "welch" and cmp["paired"]["n"] == 2 and cmp["shared_seeds"] == 2
    assert cmp["paired"]["diff"] == pytest.approx(((2.9 - 3.0) + (3.0 - 3.2)) / 2)
    assert cmp["diff"] == pytest.approx(cmp["welch"]["diff"]) and cmp["diff"] == pytest.approx(3.0667 - 3.1, abs=1e-4)
    assert any("2 shared of 3 and 3 runs" in n for n in cmp["notes"])


# ----------------------------------------------------------------------------- html, grid, probes
class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[str] = []
        self.refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        for k, v in attrs:
            if tag == "img" and k == "src":
                self.imgs.append(v)
            elif k in ("src", "href", "srcset", "action", "data"):
                self.refs.append((tag, k, v))
        if tag in ("link", "script", "iframe", "object", "embed"):
            self.refs.append((tag, "", ""))


def test_html_report_is_self_contained(tmp_path):
    cells = [{"optim.lr": lr, "model.n_layers": n} for n in (2, 4) for lr in (0.001, 0.003, 0.01)]
    runs = []
    for arm in ("baseline", "wide"):
        for cell in cells:
            for s in range(2):
                loss = 3.0 + abs(math.log10(cell["optim.lr"] / 0.003)) - 0.1 * cell["model.n_layers"] \
                       - (0.05 if arm == "wide" else 0) + s / 100
                runs.append((arm, cell, s, {5: loss + 1, 10: loss}))
    extra = [{"kind": "probe", "step": 10, "probe": "sparsity", "layer": i, "head": None, "value": 0.1 * (i + 1)}
             for i in range(2)] + [{"kind": "probe", "step": 10, "probe": "sparsity", "layer": None, "head": None,
                                    "value": 0.15}]
    root = make_sweep(tmp_path / "grid", {"baseline": {}, "wide": {"model.d_model": 64}}, runs,
                      grid={"optim.lr": [0.001, 0.003, 0.01], "model.n_layers": [2, 4]}, extra_rows=extra)
    assert main(["compare", str(root), "--log-x"]) == 0
    rep = root / "report"
    parser = _Refs()
    parser.feed((rep / "report.html").read_text())
    assert len(parser.imgs) >= 5 and parser.refs == []
    for src in parser.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    for name in ("compute.png", "grid_optim.lr.png", "grid_model.n_layers.png", "probe_sparsity.png"):
        assert (rep / name).is_file(), name

    c = build([root])
    assert len(c.arms) == 12 and len(c.data["comparisons"]) == 6        # each wide cell vs the baseline's cell
    assert all(x["baseline"].startswith("baseline__") and x["arm"].replace("wide", "baseline") == x["baseline"]
               for x in c.data["comparisons"])
    lines = {ln["label"]: ln for ln in c.data["grid"]["optim.lr"]}
    assert set(lines) == {"baseline, n_layers=2", "baseline, n_layers=4", "wide, n_layers=2", "wide, n_layers=4"}
    assert all(ln["best"] == 0.003 for ln in lines.values())
    assert {ln["best"] for ln in c.data["grid"]["model.n_layers"]} == {4}
    flops = [p["flops"] for ln in c.data["compute"] for p in ln["points"]]
    assert flops and all(f == pytest.approx(1.0e6 * 10 * TPS) for f in flops)
    probes = c.data["arms"]["baseline__lr=0.001__n_layers=2"]["probes"]["sparsity"]
    assert probes["mean"]["mean"] == pytest.approx(0.15) and probes["layers"][1]["mean"] == pytest.approx(0.2)


def test_probe_files_are_read_and_win_a_tie(tmp_path):
    run = make_run(tmp_path / "r", {5: 3.5, 10: 3.0}, extra_rows=[
        {"kind": "probe", "step": 10, "probe": "linearity", "layer": 0, "head": None, "value": 0.5}])
    d = run / "probes" / "step-00000010"
    d.mkdir(parents=True)
    (d / "probes.json").write_text(json.dumps({"step": 10, "probes": {
        "linearity": {"probe": "linearity", "layers": [0.9, 0.8], "mean": 0.85}}}))
    p = build([run]).data["arms"]
    (arm,) = p.values()
    assert [l["mean"] for l in arm["probes"]["linearity"]["layers"]] == [0.9, 0.8]
    assert build([run], at="step=9").data["arms"][next(iter(p))]["probes"] == {}     # both are at step 10


# ----------------------------------------------------------------------------- CLI errors
def test_cli_errors_name_the_culprit(tmp_path, sweep, capsys, monkeypatch):
    cases = {("--at", "soon"): "--at", ("--baseline", "nope"): "--baseline", ("--metric", "val_nothing"): "--metric"}
    for (flag, value), culprit in cases.items():
        assert main(["compare", str(sweep), flag, value]) == 2
        assert culprit in capsys.readouterr().err
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert "RUN_DIR_OR_SWEEP_DIR" in capsys.readouterr().err

    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert main(["compare", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert "--format" in err and "matplotlib" in err and "ablate[plots]" in err
    assert main(["compare", str(sweep), "--format", "json"]) == 0          # json needs no matplotlib
