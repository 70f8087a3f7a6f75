"""`ablate` command line. Exit status: 0 done (or stopped for requeue), 2 usage / config error,
1 any other failure; every message names its culprit (key, flag or file)."""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path
from typing import Any

from models.registry import ConfigError


class UsageError(ConfigError):
    pass


# A dotted key then `=`: an override wherever it stands (`model.layers.mixers.A.window=64`).
OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*=")


def _load(args: argparse.Namespace):
    from train.config import load_config
    return load_config(args.config, args.overrides)


def _default_run_dir(config_path: str) -> Path:
    """runs/<config file stem>, so re-running a command resumes its run."""
    return Path("runs") / Path(config_path).stem


# ----------------------------------------------------------------------------- commands
def run_callbacks(cfg):
    """Every callback of a training run: the trainer's own (train/callbacks) and eval's (lm-eval
    in the loop, probes). This is the composition root: the only place in train/ that imports eval/."""
    from eval.callbacks import eval_callbacks
    from train.callbacks import default_callbacks
    return default_callbacks(cfg) + eval_callbacks(cfg)


def cmd_train(args: argparse.Namespace) -> int:
    from train.trainer import install_stop_handlers, train
    install_stop_handlers()
    cfg = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config)
    result = train(cfg, run_dir, resume=args.resume, callbacks=run_callbacks(cfg))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if result.status == "requeue":
        print(f"stopped at step {result.step} for requeue; resume with the same command. run dir: {run_dir}")
        return 0
    print(summary(run_dir, result.step, result.val_loss, result.unigram_entropy))
    if result.skipped_steps:
        print(f"non-finite steps skipped (no update): {result.skipped_steps}")
    return 0


def summary(run_dir: Path, step: int, val_loss: float | None, entropy: float | None) -> str:
    import math
    lines = [f"run dir: {run_dir} (step {step})"]
    if val_loss is not None:
        lines.append(f"final validation loss: {val_loss:.4f} nats/token  perplexity: {math.exp(min(val_loss, 50)):.2f}")
    if entropy is not None:
        lines.append(f"unigram entropy of the training tokens: {entropy:.4f} nats/token "
                     f"(perplexity {math.exp(entropy):.1f}): the loss of a model that ignores context")
    return "\n".join(lines)


def cmd_config_show(args: argparse.Namespace) -> int:
    from train.config import dump_config
    print(dump_config(_load(args)), end="")
    return 0


def cmd_config_keys(args: argparse.Namespace) -> int:
    from train.keys import format_keys, key_rows
    print(format_keys(key_rows(args.section)))
    return 0


def cmd_config_diff(args: argparse.Namespace) -> int:
    from train.keys import diff_report
    print(diff_report(args.a, args.b))
    return 0


def _is_arm(token: str) -> bool:
    """`ablate params A.yaml B.yaml ...`: a positional naming a YAML file (not KEY=VALUE) is an arm."""
    return token.endswith((".yaml", ".yml")) and not OVERRIDE.match(token)


def cmd_params(args: argparse.Namespace) -> int:
    from train.config import load_config
    from train.params import arms_report, params_report
    arms = [args.config, *(t for t in args.overrides if _is_arm(t))]
    overrides = [t for t in args.overrides if not _is_arm(t)]
    if len(arms) > 1:
        print(arms_report(arms, overrides))
    else:
        print(params_report(load_config(args.config, overrides)))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from train.data import prepare_data, prepare_val_sets
    cfg = _load(args)
    data = prepare_data(cfg, full_hash=True, progress=True)
    print(f"cache: {data.cache_key}\ntokenizer: {data.tokenizer_dir} (vocab {data.vocab_size})")
    for name, ds in prepare_val_sets(cfg, data, full_hash=True, progress=True).items():
        if ds is data:
            continue
        print(f"validation set {name}: {ds.cache_key}")
    if hasattr(data, "train"):                   # a token source: its splits
        print(f"train tokens: {len(data.train.tokens):,}  documents: {len(data.train.doc_starts):,}\n"
              f"val tokens: {len(data.val.tokens):,}  documents: {len(data.val.doc_starts):,}")
    return 0


def cmd_data_bench(args: argparse.Namespace) -> int:
    from train.data import benchmark
    figures = benchmark(_load(args))
    for k, v in figures.items():
        print(f"{k}: {v:,.2f}" if isinstance(v, float) else f"{k}: {v}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from train.generate import generate_from_run
    text = generate_from_run(args.run_dir, args.prompt, step=args.step, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature, top_k=args.top_k, seed=args.seed, device=args.device)
    print(text)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from eval.probes import format_probes, run_probes, write_probes
    names = [t.strip() for t in args.probes.split(",") if t.strip()] if args.probes else None
    if args.batches is not None and args.batches < 1:
        raise UsageError("--batches", f"must be >= 1, got {args.batches}")
    report = run_probes(args.run_dir, args.step, names, n_batches=args.batches, device=args.device or "cpu")
    print(format_probes(report))
    for path in write_probes(report, args.run_dir):
        print(f"wrote {path}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from eval.compare import compare, summary_text
    c, written = compare(args.dirs, out=args.out, metric=args.metric, at=args.at, baseline=args.baseline,
                         fmt=args.format, log_x=args.log_x)
    print(summary_text(c))
    for path in written:
        print(f"wrote {path}")
    return 0


def _int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(flag, f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise UsageError(flag, f"expected positive integers, got {text!r}")
    return values


def _slurm_options(args: argparse.Namespace) -> Any:
    """launch's SlurmOptions from the Slurm flags."""
    from launch.slurm import SlurmOptions
    return SlurmOptions(nodes=args.nodes, gpus_per_node=args.gpus_per_node, nproc_per_node=args.nproc_per_node,
                        cpus_per_task=args.cpus_per_task, partition=args.partition, time=args.time,
                        account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
                        signal_lead=args.signal_lead)


def cmd_launch(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmOptions, launch_slurm, prepare_run, run_local, run_script
    from train.rundir import RunDir
    cfg = _load(args)
    run_dir = Path(args.run_dir) if args.run_dir else _default_run_dir(args.config)
    if args.slurm:
        script, job = launch_slurm(cfg, run_dir, _slurm_options(args), dry_run=args.dry_run)
        if job is None:
            print(f"rendered {script} (not submitted: --dry-run)")
        else:
            print(f"submitted job {job} for {run_dir}\nfollow: tail -f {run_dir}/slurm/{job}.out   "
                  f"ablate status {run_dir}")
        return 0
    if args.nproc is None or args.nproc < 1:
        raise UsageError("--nproc", "--local needs --nproc N (processes on this host), N >= 1")
    prepare_run(cfg, run_dir)
    run = RunDir(run_dir)
    script = run_script(cfg, SlurmOptions(nodes=1, nproc_per_node=args.nproc), run)
    if args.dry_run:
        print(f"rendered {script} (not run: --dry-run)")
        return 0
    print(f"running {script} on this host; log: {run_dir}/slurm/")
    rc = run_local(script, run.path)
    print(f"job script exited with {rc}; ablate status {run_dir}")
    return 0 if rc == 0 else 1


def cmd_sweep(args: argparse.Namespace) -> int:
    from launch.slurm import launch_sweep
    if args.slurm == args.local:
        raise UsageError("--slurm", "choose one of --slurm or --local")
    opts = _slurm_options(args) if args.slurm else None
    out = launch_sweep(args.sweep, opts, local_parallel=args.parallel, eval_tasks=args.eval,
                       max_concurrent=args.max_concurrent, dry_run=args.dry_run)
    print(f"sweep {out['root']}: {len(out['todo'])} runs to train, {len(out['done'])} already done")
    if out.get("job"):
        print(f"submitted job array {out['job']}" + (f", evaluation {out['eval_job']} after it" if out.get("eval_job")
                                                     else ""))
    elif args.dry_run and out.get("script"):
        print(f"rendered {out['script']} (not submitted: --dry-run)")
    print(f"ablate status {out['root']}")
    return 0 if all(c == 0 for c in out.get("codes", [])) else 1


def cmd_status(args: argparse.Namespace) -> int:
    from launch.status import format_status, status, status_json
    rows = status(args.path)
    print(status_json(rows) if args.json else format_status(rows))
    return 0


def _add_slurm_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--slurm", action="store_true", help="submit to Slurm (sbatch)")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=None)
    p.add_argument("--nproc-per-node", type=int, default=None, help="processes per node (default: the GPUs; "
                                                                      "required for device: cpu)")
    p.add_argument("--cpus-per-task", type=int, default=None)
    for flag in ("partition", "time", "account", "qos", "constraint"):
        p.add_argument(f"--{flag}", default=None)
    p.add_argument("--exclusive", action="store_true")
    p.add_argument("--signal-lead", type=int, default=120, help="seconds before the time limit Slurm sends USR1 "
                                                                  "(the job checkpoints and requeues itself)")
    p.add_argument("--dry-run", action="store_true", help="render the job script, do not submit or run")


def cmd_coordcheck(args: argparse.Namespace) -> int:
    from train.coordcheck import coordcheck, format_report, write_outputs
    widths, depths = _int_list("--widths", args.widths), _int_list("--depths", args.depths)
    if len(widths) == 1 or len(depths) == 1:
        raise UsageError("--widths" if len(widths) == 1 else "--depths", "a slope needs at least two values (or none)")
    if args.steps < 1:
        raise UsageError("--steps", f"must be >= 1, got {args.steps}")
    result = coordcheck(_load(args), widths, depths, steps=args.steps)
    print(format_report(result))
    if args.out:
        for path in write_outputs(result, Path(args.out)):
            print(f"wrote {path}")
    return 0


def cmd_consolidate(args: argparse.Namespace) -> int:
    from train import checkpoint as ckpt
    from train.rundir import RunDir, step_name
    run = RunDir(args.run_dir)
    if not run.exists():
        raise ConfigError("RUN_DIR", f"{args.run_dir} is not a run directory (no config.yaml)")
    try:
        step, path = ckpt.find_checkpoint(run.checkpoints, args.step)
    except FileNotFoundError as e:
        raise ConfigError("--step", str(e)) from None
    out = Path(args.out) if args.out else run.path / "consolidated" / f"{step_name(step)}.pt"
    state = ckpt.consolidate(path, out)
    n = sum(v.numel() for v in state.values())
    print(f"wrote {out}: {len(state)} tensors, {n:,} parameters (fp32) from {path}")
    return 0


def cmd_fold_norms(args: argparse.Namespace) -> int:
    from train.fold import fold_run
    out, err = fold_run(args.run_dir, step=args.step, out=args.out, force=args.force)
    print(f"wrote {out}: no norm modules, untied head; logits within {err:.2e} of {args.run_dir}")
    return 0


def cmd_export_hf(args: argparse.Namespace) -> int:
    from train.export import export_run
    out = export_run(args.run_dir, step=args.step, out=args.out, fmt=args.format, force=args.force)
    load = "trust_remote_code=True" if args.format == "ablate" else "plain transformers (LlamaForCausalLM)"
    print(f"wrote {out} ({args.format} format): AutoModelForCausalLM.from_pretrained(DIR) with {load}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from train.bench import bench_mixers, loss_memory, run_bench
    if args.loss_memory:
        print(loss_memory(_load(args)))
        return 0
    if args.mixers:
        try:
            seq_lens = [int(t) for t in args.seq_lens.split(",") if t.strip()]
        except ValueError:
            raise UsageError("--seq-lens", f"expected comma-separated integers, got {args.seq_lens!r}") from None
        if not seq_lens or min(seq_lens) < 1:
            raise UsageError("--seq-lens", f"expected positive lengths, got {args.seq_lens!r}")
        print(bench_mixers(_load(args), seq_lens, steps=args.steps, warmup=args.warmup))
        return 0
    print(run_bench(_load(args), steps=args.steps, warmup=args.warmup, reference=args.reference))
    return 0


# ----------------------------------------------------------------------------- parser
def _add_config(p: argparse.ArgumentParser, config_help: str = "YAML config file") -> None:
    p.add_argument("config", help=config_help)
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, values parsed as YAML (anywhere on the command line)")


def _values_taken(parser: argparse.ArgumentParser, tokens: list[str], j: int) -> int:
    """How many of the tokens after option tokens[j] are its values (as argparse will read them)."""
    token = tokens[j]
    if token.startswith("--") and "=" in token:
        return 0                                          # --option=value
    actions = parser._option_string_actions
    action = actions.get(token)
    if action is None and token.startswith("--"):         # argparse accepts unique prefixes
        found = {a for s, a in actions.items() if s.startswith(token)}
        action = found.pop() if len(found) == 1 else None
    if action is None or action.nargs == 0:
        return 0
    if action.nargs is None or isinstance(action.nargs, int):
        return 1 if action.nargs is None else action.nargs
    limit = 1 if action.nargs == "?" else len(tokens)    # ?, *, +: up to the next option
    n = 0
    while n < limit and j + 1 + n < len(tokens) and not tokens[j + 1 + n].startswith("-"):
        n += 1
    return n


def gather_overrides(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """argv with the chosen command's KEY=VALUE overrides moved right after its positionals, so
    they may stand anywhere (`ablate train C --run-dir D optim.lr=1e-3`): argparse reads a
    positional list only in one stretch. An option's value stays its value (`--out a=b`); commands
    without overrides, and command lines with `--`, are left as they are."""
    i = 0
    while (sub := next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)):
        if i >= len(argv) or argv[i] not in sub.choices:
            return argv                                   # no command (or a typo): argparse says so
        parser, i = sub.choices[argv[i]], i + 1
    rest = argv[i:]
    if "--" in rest or not any(a.dest == "overrides" for a in parser._actions):
        return argv
    positionals, overrides, options = [], [], []
    j = 0
    while j < len(rest):
        if rest[j].startswith("-") and rest[j] != "-":
            n = _values_taken(parser, rest, j)
            options += rest[j: j + 1 + n]
            j += 1 + n
            continue
        (overrides if OVERRIDE.match(rest[j]) else positionals).append(rest[j])
        j += 1
    return argv[:i] + positionals + overrides + options


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:       # argparse's own errors: exit 2 with the message
        self.print_usage(sys.stderr)
        raise UsageError("", message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="ablate", description="LLM pretraining for architecture ablations")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    t = sub.add_parser("train", help="train (or resume) a run")
    _add_config(t)
    t.add_argument("--run-dir", help="default: runs/<config stem>")
    t.add_argument("--resume", action="store_true", help="require an existing run to resume")
    t.set_defaults(fn=cmd_train)

    c = sub.add_parser("config", help="config tools")
    csub = c.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = csub.add_parser("show", help="print the fully resolved config")
    _add_config(show)
    show.set_defaults(fn=cmd_config_show)
    keys = csub.add_parser("keys", help="every config key with its type, default and doc")
    keys.add_argument("section", nargs="?", help="a dotted section or key (optim, model.layers.mixers); default: all")
    keys.set_defaults(fn=cmd_config_keys)
    diff = csub.add_parser("diff", help="the resolved-config keys in which two configs or run dirs differ")
    diff.add_argument("a", metavar="A", help="config file or run dir")
    diff.add_argument("b", metavar="B", help="config file or run dir")
    diff.set_defaults(fn=cmd_config_diff)

    pa = sub.add_parser("params", help="parameter counts, FLOPs/token, optimizer groups; several configs: "
                                       "arms side by side")
    _add_config(pa, "YAML config file; further *.yaml positionals are arms compared with it "
                    "(the overrides apply to every arm)")
    pa.set_defaults(fn=cmd_params)

    d = sub.add_parser("data", help="data tools")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prep = dsub.add_parser("prepare", help="tokenize into the cache (full content hash)")
    _add_config(prep)
    prep.set_defaults(fn=cmd_data_prepare)
    db = dsub.add_parser("bench", help="tokenization MB/s and loader tokens/s")
    _add_config(db)
    db.set_defaults(fn=cmd_data_bench)

    g = sub.add_parser("generate", help="sample from a run's checkpoint")
    g.add_argument("run_dir")
    g.add_argument("--step", default="latest")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None,
                   help="default: the run's config `device`")
    g.set_defaults(fn=cmd_generate)

    pr = sub.add_parser("probe", help="probes of a checkpoint per layer (FFN sparsity, layer linearity): a table, "
                                      "RUN_DIR/probes/step-XXXXXXXX/{probes.json,<probe>.png}")
    pr.add_argument("run_dir")
    pr.add_argument("--step", default="latest")
    pr.add_argument("--probes", default=None, help="comma-separated probe names (default: every one that applies)")
    pr.add_argument("--batches", type=int, default=None, help="validation micro-batches (default: train.val_batches)")
    pr.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cpu")
    pr.set_defaults(fn=cmd_probe)

    cm = sub.add_parser("compare", help="group runs into arms and write a report with statistics and plots",
                        description="Arms: runs with the same resolved config up to the seed, seed-derived keys, "
                                    "name and operational keys (docs/compare.md). Writes report.md, a "
                                    "self-contained report.html and PNGs (or report.json).")
    cm.add_argument("dirs", nargs="+", metavar="RUN_DIR_OR_SWEEP_DIR")
    cm.add_argument("--baseline", default=None, help="the arm the others are compared with (default: the "
                                                     "sweep's first arm, else the first run's)")
    cm.add_argument("--out", default=None, help="default: RUN_DIR/report or SWEEP_DIR/report (required for several)")
    cm.add_argument("--metric", default="val_loss", help="val_loss (default), val_ppl, val_<name>[@SET], loss, "
                                                         "TASK/METRIC[@HASH8]")
    cm.add_argument("--at", default="final", help="final (default), step=N or tokens=N: the nearest row at or before")
    cm.add_argument("--format", default="md", choices=("md", "json"), help="md: report.md + report.html + PNGs "
                                                                          "(needs matplotlib); json: report.json")
    cm.add_argument("--log-x", action="store_true", help="log-scale token and time axes of the curves")
    cm.set_defaults(fn=cmd_compare)

    ck = sub.add_parser("checkpoint", help="checkpoint tools")
    cksub = ck.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    cons = cksub.add_parser("consolidate", help="one full-precision state dict, no process group")
    cons.add_argument("run_dir")
    cons.add_argument("--step", default="latest")
    cons.add_argument("--out", help="default: RUN_DIR/consolidated/step-XXXXXXXX.pt")
    cons.set_defaults(fn=cmd_consolidate)
    fold = cksub.add_parser("fold-norms", help="fold a finished LayerNorm-removal run's frozen norms into the "
                                               "weights: a run dir with no norm modules and the same logits")
    fold.add_argument("run_dir")
    fold.add_argument("--step", default="latest")
    fold.add_argument("--out", help="default: RUN_DIR-folded (beside the run)")
    fold.add_argument("--force", action="store_true", help="replace an existing --out")
    fold.set_defaults(fn=cmd_fold_norms)

    ex = sub.add_parser("export-hf", help="a checkpoint as a Hugging Face folder (docs/export.md)")
    ex.add_argument("run_dir")
    ex.add_argument("--step", default="latest")
    ex.add_argument("--out", help="default: RUN_DIR/hf/step-XXXXXXXX (with -llama for --format llama)")
    ex.add_argument("--format", choices=("ablate", "llama"), default="ablate",
                    help="ablate: AutoModelForCausalLM with trust_remote_code, every architecture; "
                         "llama: a plain LlamaForCausalLM checkpoint, Llama architectures only")
    ex.add_argument("--force", action="store_true", help="replace an --out folder that is not an export")
    ex.set_defaults(fn=cmd_export_hf)

    cc = sub.add_parser("coordcheck", help="activation scales across widths and depths (muP coordinate check)")
    _add_config(cc)
    cc.add_argument("--widths", default="64,128,256,512", help="d_model values (at the config's depth)")
    cc.add_argument("--depths", default="2,4,8,16", help="n_layers values (at the config's width)")
    cc.add_argument("--steps", type=int, default=10)
    cc.add_argument("--out", help="folder for coordcheck.json and PNG plots (plots need matplotlib)")
    cc.set_defaults(fn=cmd_coordcheck)

    b = sub.add_parser("bench", help="time the real training step")
    _add_config(b)
    b.add_argument("--steps", type=int, default=10)
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--reference", action="store_true", help="also time a plain-PyTorch decoder of the same shape")
    b.add_argument("--mixers", action="store_true", help="time each distinct mixer of the pattern alone")
    b.add_argument("--seq-lens", default="512,2048", help="with --mixers: comma-separated sequence lengths")
    b.add_argument("--loss-memory", action="store_true",
                   help="peak memory of forward+backward with the LM-head loss chunked and in one pass")
    b.set_defaults(fn=cmd_bench)

    la = sub.add_parser("launch", help="train a run as a Slurm job (--slurm) or its job script here (--local)")
    _add_config(la)
    la.add_argument("--run-dir", help="default: runs/<config stem>")
    la.add_argument("--local", action="store_true", help="run the rendered job script on this host")
    la.add_argument("--nproc", type=int, default=None, help="with --local: processes")
    _add_slurm_flags(la)
    la.set_defaults(fn=cmd_launch)

    sw = sub.add_parser("sweep", help="expand a sweep (arms x grid x seeds) and train it: a job array or here")
    sw.add_argument("sweep", help="sweep YAML (configs/sweeps/<name>.yaml)")
    sw.add_argument("--local", action="store_true", help="train the runs on this host")
    sw.add_argument("--parallel", type=int, default=None, help="with --local: runs at a time (default 1)")
    sw.add_argument("--max-concurrent", type=int, default=None, help="with --slurm: the array's %%M throttle")
    sw.add_argument("--eval", default=None, metavar="TASKS", help="evaluate every run's final checkpoint after "
                                                                   "training (comma-separated lm-eval tasks)")
    _add_slurm_flags(sw)
    sw.set_defaults(fn=cmd_sweep)

    st = sub.add_parser("status", help="each run's state, step, losses and Slurm job")
    st.add_argument("path", metavar="RUN_DIR_OR_SWEEP_DIR")
    st.add_argument("--json", action="store_true")
    st.set_defaults(fn=cmd_status)

    from eval.cli import add_eval_parser
    add_eval_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args = parser.parse_args(gather_overrides(parser, argv))
        return args.fn(args)
    except ConfigError as e:
        print(f"ablate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ablate: interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # noqa: BLE001 - the last line of defence (DCP's errors are BaseExceptions)
        from train.checkpoint import UnusableCheckpoint
        if isinstance(e, UnusableCheckpoint):              # its one line already names the checkpoints
            print(f"ablate: error: {e}", file=sys.stderr)
            return 1
        import traceback
        traceback.print_exc()
        print(f"ablate: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def train_main(argv: list[str] | None = None) -> int:
    """`python -m train CONFIG ...`: the same as `ablate train CONFIG ...`."""
    argv = sys.argv[1:] if argv is None else argv
    return main(["train", *argv])


if __name__ == "__main__":
    sys.exit(main())
