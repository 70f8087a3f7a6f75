"""`ablate checkpoint fold-norms RUN_DIR [--step N] [--out DIR]`: the end of LayerNorm removal.

Folds a finished removal run's frozen norms into the adjacent weights (models/norm_fold.py) and
writes a run-dir-shaped folder (default RUN_DIR-folded/): config.yaml with `norm.block/final:
none`, no removal schedule and an untied head; one complete checkpoint at the same step (model
weights, an empty optimizer state, the trainer state and RNG of the source checkpoint); the
tokenizer; fold.json (source, step, the logits check). `ablate eval`, `generate`, `export-hf`
and `init_from` read it like any run. Resuming it trains on with fresh AdamW moments.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from models.norm_fold import FoldError, fold_norms
from models.registry import ConfigError
from train import checkpoint as ckpt
from train.config import dump_config
from train.rundir import RunDir, code_version, step_name

FOLD_RECORD = "fold.json"


def fold_run(run_dir: str | Path, step: int | str | None = "latest", out: str | Path | None = None,
             force: bool = False) -> tuple[Path, float]:
    """Write the folded run of `run_dir`'s checkpoint `step`; returns (its folder, the largest
    logit difference against the source model)."""
    from train.export import staging
    from train.optim import build_optimizer
    from train.runtime import load_model

    run = RunDir(run_dir)
    model, cfg, found = load_model(run_dir, step, "cpu")          # ConfigError naming RUN_DIR or --step
    dest = Path(out) if out is not None else run.path.with_name(run.path.name + "-folded")
    if dest.resolve() == run.path.resolve():
        raise ConfigError("--out", "must differ from RUN_DIR (the source run is never modified)")
    if dest.exists() and any(dest.iterdir()) and not force:
        what = ("already holds a folded run" if (dest / FOLD_RECORD).is_file()
                else f"exists and is not a folded run (no {FOLD_RECORD})")
        raise ConfigError("--out", f"{dest} {what}; pass --force to replace it")
    try:
        folded = fold_norms(model)
    except FoldError as e:
        raise ConfigError("RUN_DIR", f"cannot fold {run.path} at {step_name(found)}: {e}") from None

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.model.vocab_size, (2, min(64, cfg.model.max_seq_len)), generator=g)
    with torch.no_grad():
        err = (model(ids).logits - folded(ids).logits).abs().max().item()

    cfg.model = folded.cfg
    _, src = ckpt.find_checkpoint(run.checkpoints, found)
    trainer_state = torch.load(src / ckpt.TRAINER_STATE, weights_only=False)
    trainer_state.get("callbacks", {}).pop("norm_removal", None)
    trainer_state.pop("optim_empty", None)
    rng_path = src / ckpt.rng_file(0)
    rng = torch.load(rng_path, weights_only=False) if rng_path.exists() else None
    with staging(dest) as tmp:
        folded_run = RunDir(tmp)
        saved = run.read_config()
        records = {k: saved[k] for k in ("derived", "code_version") if k in saved}
        if "derived" in records:             # the removal section is gone, and what was derived for it
            records["derived"] = {k: v for k, v in records["derived"].items() if not k.startswith("model.norm.")}
        folded_run.write_config(dump_config(cfg, records))
        folded.train()
        optimizer = build_optimizer(folded, cfg)
        ckpt.save_checkpoint(folded_run.checkpoints, found, folded, optimizer, trainer_state, rng)
        if run.tokenizer_dir.is_dir():
            shutil.copytree(run.tokenizer_dir, folded_run.tokenizer_dir)
        (tmp / FOLD_RECORD).write_text(json.dumps(
            {"source": str(run.path.resolve()), "step": found, "max_abs_logit_diff": err,
             "code_version": code_version()}, indent=2) + "\n")
    return dest, err
