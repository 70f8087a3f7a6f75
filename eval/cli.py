"""`ablate eval RUN_DIR [--step latest|all|N] --tasks T1,T2 [--include-path DIR] [--data-dir DIR]
[--limit N] [--num-fewshot K] [--batch-size B]`, registered into train/cli.py's parser."""
from __future__ import annotations

import argparse
import os
from typing import Any


def add_eval_parser(subparsers: Any) -> argparse.ArgumentParser:
    e = subparsers.add_parser("eval", help="run lm-eval tasks on a run's checkpoints",
                              description="Results: RUN_DIR/eval/step-XXXXXXXX.<hash8>.json and eval rows in "
                                          "metrics.jsonl; an existing result with the same settings is reused. "
                                          "Local tasks: ablate_val_ppl (the run's validation text), "
                                          "ablate_hellaswag and ablate_arc_easy (need --data-dir).")
    e.add_argument("run_dir", help="a run dir, or a sweep dir (every run of its manifest)")
    e.add_argument("--step", default="latest", help="latest (default), all, or a checkpoint step")
    e.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    e.add_argument("--include-path", action="append", default=None,
                   help="extra folder of task YAMLs (repeatable; default: the run's eval.include_path)")
    e.add_argument("--data-dir", default=None,
                   help="folder with hellaswag/ and arc_easy/ (default: the run's eval.data_dir)")
    e.add_argument("--limit", type=_limit, default=None, help="at most N documents per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default=None, help="auto | cpu | cuda (default: the run's device)")
    e.set_defaults(fn=cmd_eval)
    return e


def _limit(text: str) -> int | float:
    """N documents, or a fraction < 1 of each task as lm-eval allows."""
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def cmd_eval(args: argparse.Namespace) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from eval.results import format_result
    from eval.runner import EvalSpec, evaluate_run
    from train.runtime import load_run_config

    from launch.sweep import is_sweep_dir, sweep_run_dirs

    run_dirs = sweep_run_dirs(args.run_dir) if is_sweep_dir(args.run_dir) else [args.run_dir]   # a sweep: each run
    for run_dir in run_dirs:
        cfg = load_run_config(run_dir)       # ConfigError naming RUN_DIR when it is not a run
        include = args.include_path if args.include_path is not None else (
            [cfg.eval.include_path] if cfg.eval.include_path else [])
        spec = EvalSpec(tasks=args.tasks, limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                        include_path=include, data_dir=args.data_dir or cfg.eval.data_dir)
        for result in evaluate_run(run_dir, args.step, spec, device=args.device):
            print(format_result(result))
    return 0
