"""Helpers shared by test files (importable as `ablate_testing`: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "seed": 0,
    "device": "cpu",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "tokenizer": {"kind": "bpe", "vocab_size": 384},
    "data": {"source": "embedded", "seq_len": 32, "embedded": {"max_bytes": 400_000}, "val_fraction": 0.05},
    "train": {"steps": 12, "global_batch": 8, "micro_batch": 4, "log_every": 1, "val_every": 6,
              "val_batches": 2, "progress": False},
    "optim": {"name": "adamw", "lr": 1.0e-2, "schedule": {"kind": "cosine", "warmup": 2}},
    "checkpoint": {"every": 4, "keep_last": 10},
}

# The 2-rank tests' run: 4 micro-batches of 2 per step, so 1, 2 or 4 ranks divide it.
DIST = {
    "seed": 0, "device": "cpu",
    "model": {"d_model": 32, "n_layers": 2, "n_heads": 2, "max_seq_len": 64},
    "tokenizer": {"kind": "bpe", "vocab_size": 384},
    "data": {"source": "embedded", "seq_len": 32, "embedded": {"max_bytes": 400_000}},
    "train": {"steps": 10, "global_batch": 8, "micro_batch": 2, "log_every": 1, "val_every": 5,
              "val_batches": 2, "progress": False},
    "optim": {"name": "adamw", "lr": 1.0e-2, "schedule": {"kind": "cosine", "warmup": 2}},
    "checkpoint": {"every": 5, "keep_last": 10},
}


def _nan_losses(module, args, kwargs, output):
    """Forward hook: every loss term of a training forward becomes NaN."""
    if module.training and output.losses:
        from models.context import LossTerm
        output.losses = {k: LossTerm(t.value * float("nan"), t.reduction) for k, t in output.losses.items()}
    return output


def nan_loss(steps: set[int]):
    """A callback that makes the loss NaN on the given 1-based steps (fault injection for the
    finite guard): a forward hook on the model for those steps' training forwards."""
    from train.callbacks import Callback

    class NaNLoss(Callback):
        name = "test_nan_loss"

        def __init__(self) -> None:
            self.handle = None

        def on_step_start(self, state) -> None:
            if state.step + 1 in steps:
                self.handle = state.model.register_forward_hook(_nan_losses, with_kwargs=True)

        def on_step_end(self, state, metrics) -> None:
            if self.handle is not None:
                self.handle.remove()
                self.handle = None

    return NaNLoss()


def with_nan(cfg, steps: set[int]) -> list:
    """The default callbacks of `cfg` plus NaN losses on `steps`."""
    from train.callbacks import default_callbacks
    return default_callbacks(cfg) + [nan_loss(steps)]


def train_losses(model, ids, steps: int = 20, lr: float = 1.0e-2) -> list[float]:
    """Train `model` on one batch of token ids for `steps` AdamW steps (CE per target token);
    every gradient and, at the end, every parameter must be finite. Returns the losses."""
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    targets = ids[:, 1:].numel()
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = model(ids[:, :-1], labels=ids[:, 1:]).losses["ce"].value / targets
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return losses


def err_ratio(a, b) -> float:
    """RMS of a - b over the RMS of the reference b, in fp32: the bf16 GPU tests' measure (fla's
    own kernel tests use it)."""
    return float((a.float() - b.float()).pow(2).mean().sqrt() / b.float().pow(2).mean().sqrt())


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def make_cfg(base: dict, **overrides):
    """A Config from `base` with dotted overrides given as keyword args (dots as '__')."""
    from train.config import apply_overrides, config_from_dict
    ov = [f"{k.replace('__', '.')}={json.dumps(v)}" for k, v in overrides.items()]
    data = apply_overrides(base, ov)
    cfg = config_from_dict(data)
    cfg.name = "test"
    return cfg


def train_rows(run_dir: Path, kind: str = "train") -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


def subprocess_env(cache_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["ABLATE_CACHE"] = str(cache_dir)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env["TOKENIZERS_PARALLELISM"] = "false"
    return env


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst



def torchrun(setup: dict, run_dir: Path, *overrides: str, nproc: int = 2, env: dict | None = None,
             wait: bool = True, timeout: float = 180, nan_steps: str | None = None):
    """`torchrun -m train setup["cfg"] ...` on `nproc` ranks: (returncode, output), or the Popen.

    nan_steps="3,5": run through tests/train_with_nan.py, which adds the NaNLoss callback."""
    entry = ["-m", "train"] if nan_steps is None else [str(Path(__file__).parent / "train_with_nan.py"), nan_steps]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           *entry, str(setup["cfg"]), *overrides, "--run-dir", str(run_dir)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**subprocess_env(setup["cache"]), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def rewind(run: Path, to_step: int) -> None:
    """Delete the checkpoints after `to_step` and DONE, so the run resumes from `to_step`."""
    from train import checkpoint as ckpt
    for step, path in ckpt.complete_checkpoints(run / "checkpoints"):
        if step > to_step:
            shutil.rmtree(path)
    (run / "DONE").unlink(missing_ok=True)


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll `pred` (files may be mid-write) until true; fail if `proc` ends first or time runs out."""
    t0 = time.time()
    while True:
        try:
            if pred():
                return
        except (FileNotFoundError, ValueError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.05)
