"""Result files: reuse by settings hash, eval rows, `ablate eval` flags and errors."""
from __future__ import annotations

import argparse
import json

import pytest
from ablate_testing import train_rows

from eval.cli import add_eval_parser
from eval.results import settings_hash
from eval.runner import EvalSpec, evaluate_run
from models.registry import ConfigError


def _eval_files(run_dir):
    return sorted(p.name for p in (run_dir / "eval").glob("step-*.json"))


def test_result_reused_by_settings_hash(fresh_run):
    spec = EvalSpec(["ablate_val_ppl"], limit=1)
    [first] = evaluate_run(fresh_run, "latest", spec)
    path = fresh_run / "eval" / f"step-00000016.{first['hash8']}.json"
    assert path.is_file() and not first["reused"]
    saved = json.loads(path.read_text())
    assert saved["settings"]["limit"] == 1 and saved["settings"]["versions"] == {"ablate_val_ppl": 1.0}
    assert settings_hash(saved["settings"]) == first["hash8"]
    n_rows = len(train_rows(fresh_run, "eval"))
    mtime = path.stat().st_mtime_ns

    [again] = evaluate_run(fresh_run, "latest", EvalSpec(["ablate_val_ppl"], limit=1, batch_size=3))
    assert again["reused"] and again["metrics"] == first["metrics"]
    assert path.stat().st_mtime_ns == mtime and len(train_rows(fresh_run, "eval")) == n_rows

    [other] = evaluate_run(fresh_run, "latest", EvalSpec(["ablate_val_ppl"], limit=2))   # other settings
    assert other["hash8"] != first["hash8"] and not other["reused"]
    assert len(_eval_files(fresh_run)) == 2 and json.loads(path.read_text()) == saved

    # rows dropped from metrics.jsonl (a resume truncates it) come back on reuse
    metrics = fresh_run / "metrics.jsonl"
    metrics.write_text("".join(l + "\n" for l in metrics.read_text().splitlines() if '"eval"' not in l))
    evaluate_run(fresh_run, "latest", spec)
    assert {r["hash8"] for r in train_rows(fresh_run, "eval")} == {first["hash8"]}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ablate")
    add_eval_parser(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_step_all_and_errors(fresh_run, capsys):
    p = _parser()
    args = p.parse_args(["eval", str(fresh_run), "--step", "all", "--tasks", "ablate_val_ppl", "--limit", "1"])
    assert args.fn(args) == 0
    out = capsys.readouterr().out
    assert "step 8" in out and "step 16" in out and "byte_perplexity" in out
    assert [n[:13] for n in _eval_files(fresh_run)] == ["step-00000008", "step-00000016"]

    bad = {("--tasks", "no_such_task_xyz"): "--tasks", ("--tasks", "ablate_hellaswag"): "--data-dir",
           ("--tasks", "ablate_arc_easy", "--data-dir", str(fresh_run / "nope")): "--data-dir",
           ("--tasks", "ablate_val_ppl", "--step", "5"): "--step",
           ("--tasks", "ablate_val_ppl", "--include-path", str(fresh_run / "nope")): "--include-path",
           ("--tasks", "ablate_val_ppl", "--limit", "0"): "--limit"}
    for flags, key in bad.items():
        args = p.parse_args(["eval", str(fresh_run), *flags])
        with pytest.raises(ConfigError) as e:
            args.fn(args)
        assert e.value.key == key, (flags, e.value)
    args = p.parse_args(["eval", str(fresh_run / "missing"), "--tasks", "ablate_val_ppl"])
    with pytest.raises(ConfigError, match="RUN_DIR"):
        args.fn(args)


def test_include_path_task(fresh_run, tmp_path):
    """A user task YAML from --include-path runs offline next to ours (no built-in index)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"context": f"x = {i}\ny =", "target": f" {i + 1}"}) + "\n" for i in range(5)))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "toy.yaml").write_text(
        "task: toy_ll\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {data}}}}}\n"
        "validation_split: validation\noutput_type: loglikelihood\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        "metric_list: [{metric: perplexity, aggregation: perplexity, higher_is_better: false},"
        " {metric: acc, aggregation: mean, higher_is_better: true}]\nmetadata: {version: 2.0}\n")
    (tasks / "toy_gen.yaml").write_text(
        "task: toy_gen\ndataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{validation: {data}}}}}\n"
        "validation_split: validation\noutput_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs: {until: ["\\n"], max_gen_toks: 8, do_sample: false}\n'
        "metric_list: [{metric: exact_match, aggregation: mean, higher_is_better: true}]\n")
    [res] = evaluate_run(fresh_run, "latest", EvalSpec(["toy_ll", "toy_gen"], include_path=[str(tasks)],
                                                       bootstrap_iters=10))
    assert set(res["metrics"]["toy_ll"]) == {"perplexity", "acc"} and res["versions"]["toy_ll"] == 2.0
    assert 0.0 <= res["metrics"]["toy_gen"]["exact_match"]["value"] <= 1.0


def test_ablate_cli_has_eval(fresh_run, capsys):
    """Needs the integration line in train/cli.py's build_parser (add_eval_parser)."""
    from train.cli import main
    assert main(["eval", str(fresh_run), "--tasks", "ablate_val_ppl", "--limit", "1"]) == 0
    assert "bits_per_byte" in capsys.readouterr().out
    assert main(["eval", str(fresh_run), "--tasks", "ablate_hellaswag"]) == 2
    assert "--data-dir" in capsys.readouterr().err
