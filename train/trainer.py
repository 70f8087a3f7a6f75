"""The training loop: one loop, read top to bottom.

setup (run dir, data, model, optimizer, resume) -> for each step: gather the step's
micro-batches, count its target tokens, forward/backward each micro-batch with the loss
normalised by that count, clip, finite guard, optimizer step -> log, validate, checkpoint,
honour stop requests. The distributed issue adds backends that wrap model/optimizer without
changing this loop.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import models
from models.flops import flops_per_token
from models.registry import ConfigError
from train import checkpoint as ckpt
from train.config import Config, config_drift, dump_config
from train.optim import build_optimizer, set_lr
from train.rundir import RunDir, code_version
from train.schedule import lr_factor

IGNORE_INDEX = -100
# Nominal dense bf16 peak, TFLOP/s, by a substring of the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


# ----------------------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "device=cuda but no CUDA device is available")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA, nothing on CPU (fp32 keeps CPU runs exactly reproducible)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(cfg: Config, device: torch.device) -> float | None:
    if cfg.train.peak_tflops is not None:
        return cfg.train.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed (not averaged) cross-entropy over target tokens, plus the summed z-loss term."""
    logits = logits.float().flatten(0, 1)
    labels = labels.flatten()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if z_loss > 0:
        valid = labels != IGNORE_INDEX
        z = (torch.logsumexp(logits[valid], dim=-1) ** 2).sum() * z_loss
        return ce, z
    return ce, torch.zeros((), device=logits.device)


def _test_nan_steps() -> set[int]:
    """Fault injection for tests: ABLATE_TEST_NAN_STEPS="3,5" makes those steps' loss NaN."""
    raw = os.environ.get("ABLATE_TEST_NAN_STEPS", "")
    return {int(s) for s in raw.split(",") if s.strip()}


_stop_signalled = False


def _on_stop_signal(signum, frame) -> None:
    global _stop_signalled
    _stop_signalled = True       # only a flag: a second signal during a save changes nothing


def install_stop_handlers() -> None:
    """For processes that exist to train (the CLI): SIGTERM / SIGUSR1 set the stop flag for the
    whole process lifetime, so a late signal after the final save cannot kill it mid-exit."""
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _on_stop_signal)


class StopRequest:
    """SIGTERM / SIGUSR1 or a STOP file -> checkpoint at the next step boundary and requeue."""

    def __init__(self, run: RunDir):
        self.run = run
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        global _stop_signalled
        if signal.getsignal(signal.SIGTERM) is not _on_stop_signal:
            _stop_signalled = False       # a fresh in-process run; under the CLI keep early signals
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._old[sig] = signal.signal(sig, _on_stop_signal)
            except ValueError:    # not the main thread (e.g. inside a test runner thread)
                pass

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        return _stop_signalled or self.run.has("STOP")


@dataclass
class TrainResult:
    status: str                    # "done" | "requeue" | "failed"
    step: int
    run_dir: Path
    val_loss: float | None = None
    unigram_entropy: float | None = None    # nats/token of the training tokens: the bar to beat


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy (nats) of the token frequency distribution: what a context-free model reaches."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------- setup
def prepare_run_dir(cfg: Config, run: RunDir, resume: bool) -> dict[str, Any] | None:
    """Check a resumed run's saved config; returns it (None for a new run)."""
    if not run.exists():
        if resume:
            raise ConfigError("--resume", f"no run to resume at {run.path} (no config.yaml)")
        return None
    saved = run.read_config()
    saved.pop("code_version", None)
    current = cfg.to_dict()
    if current["model"]["vocab_size"] is None:
        current["model"]["vocab_size"] = saved.get("model", {}).get("vocab_size")
    drift = config_drift(saved, current)
    if drift:
        raise ConfigError("", f"the config differs from the one saved in {run.config_path} in keys that "
                              f"cannot change on resume:\n  " + "\n  ".join(drift)
                          + "\nUse another --run-dir for a new run.")
    return saved


def build_model(cfg: Config, device: torch.device) -> models.Decoder:
    torch.manual_seed(cfg.seed)
    return models.Decoder(cfg.model).to(device)


# ----------------------------------------------------------------------------- loop
def train(cfg: Config, run_dir: str | Path, resume: bool = False) -> TrainResult:
    from train import data as data_mod     # data imports tokenizers / datasets: keep `import train` light

    run = RunDir(run_dir)
    stop = StopRequest(run)
    prepare_run_dir(cfg, run, resume)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    data = data_mod.prepare_data(cfg, progress=cfg.train.progress)
    cfg.model.vocab_size = cfg.resolved_vocab_size(data.vocab_size)
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"vocabulary ({data.vocab_size})")
    run.path.mkdir(parents=True, exist_ok=True)
    run.write_config(dump_config(cfg, {"code_version": code_version()}))
    if data.tokenizer_dir is not None and not run.tokenizer_dir.exists():
        data_mod.copy_tokenizer(data, run.tokenizer_dir)

    seed_everything(cfg.seed)
    model = build_model(cfg, device)
    optimizer = build_optimizer(model, cfg)
    fpt = flops_per_token(model, cfg.data.seq_len)
    peak = peak_flops(cfg, device)

    # ---- resume, or start (optionally from another run's weights)
    ckpt.clean_partial(run.checkpoints)
    start_step, sample_index = 0, 0
    latest = ckpt.latest_checkpoint(run.checkpoints)
    if latest is not None:
        start_step, path = latest
        state = ckpt.load_checkpoint(path, model, optimizer)
        sample_index = state["data"]["sample_index"]
        set_rng_state(state["rng"])
        run.truncate_metrics(start_step)
        run.log({"kind": "event", "event": "resume", "step": start_step, "checkpoint": str(path)})
    else:
        run.truncate_metrics(0)
        if cfg.init_from:
            _init_from(cfg.init_from, model)
            run.log({"kind": "event", "event": "init_from", "step": 0, "source": cfg.init_from})
    run.clear_marker("STOP", "REQUEUE", "FAILED", "DONE")
    entropy = unigram_entropy(data.train.tokens)
    if start_step == 0:
        run.log({"kind": "event", "event": "data", "step": 0, "train_tokens": int(len(data.train.tokens)),
                 "val_tokens": int(len(data.val.tokens)), "unigram_entropy": entropy,
                 "cache": data.cache_key})

    loader = data_mod.Loader(data.train, cfg.data.seq_len, cfg.train.micro_batch, cfg.data.seed,
                             start_index=sample_index)
    val_data = data_mod.val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.val_batches)
    accum = cfg.train.global_batch // cfg.train.micro_batch
    stop.install()
    nan_steps = _test_nan_steps()
    logger = MetricLogger(cfg, run)

    def save(step: int) -> None:
        info = ckpt.save_checkpoint(run.checkpoints, step, model, optimizer, {
            "step": step, "data": loader.state_dict(), "rng": rng_state(), "tokens": step * tokens_per_step})
        if not info.get("existed"):
            run.log({"kind": "event", "event": "checkpoint", "step": step,
                     "seconds": round(info["seconds"], 4), "bytes": info["bytes"]})
        ckpt.prune(run.checkpoints, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)

    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
    val_loss = None
    step = start_step
    progress = _progress(cfg, start_step)
    try:
        t_last, tokens_since = time.perf_counter(), 0
        while step < cfg.train.steps:
            if stop.requested():
                save(step)
                run.set_marker("REQUEUE", f"stopped at step {step}")
                run.clear_marker("STOP")
                return TrainResult("requeue", step, run.path, val_loss, entropy)

            factor = lr_factor(step, cfg.train.steps, cfg.optim.schedule)
            set_lr(optimizer, factor)
            lr = cfg.optim.lr * factor
            model.train()
            batches = [loader.next_batch() for _ in range(accum)]
            n_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            loss_sum = 0.0
            for b in batches:
                x, y = b["input_ids"].to(device), b["labels"].to(device)
                doc_ids = b["doc_ids"].to(device) if cfg.model.doc_mask else None
                with autocast(device):
                    logits, _ = model(x, doc_ids=doc_ids)
                ce, z = lm_loss(logits, y, cfg.train.z_loss)
                loss = (ce + z) / max(n_targets, 1)
                if step + 1 in nan_steps:
                    loss = loss * float("nan")
                loss.backward()
                loss_sum += float(loss.detach()) if step + 1 in nan_steps else ce.item() / max(n_targets, 1)
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), clip))
            step += 1
            if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
                optimizer.zero_grad(set_to_none=True)
                if cfg.train.nonfinite == "halt":
                    raise FloatingPointError(f"non-finite loss ({loss_sum}) or grad norm ({grad_norm}) "
                                             f"at step {step} (train.nonfinite=halt)")
                run.log({"kind": "event", "event": "skip_nonfinite", "step": step,
                         "loss": str(loss_sum), "grad_norm": str(grad_norm)})
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens_since += tokens_per_step
            samples = [int(batches[0]["indices"][0]), int(batches[-1]["indices"][-1])]

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                logger.log({"kind": "train", "step": step, "tokens": step * tokens_per_step,
                            "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                            "mfu": (tps * fpt / peak) if peak else None, "mem_gb": memory_gb(device),
                            "time_s": logger.elapsed(), "samples": samples})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")

            if (cfg.train.val_every and step % cfg.train.val_every == 0) or step == cfg.train.steps:
                val_loss = evaluate_loss(model, val_data, device, cfg)
                logger.log({"kind": "val", "step": step, "tokens": step * tokens_per_step,
                            "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                save(step)

        save(step)
        if val_loss is None:
            val_loss = _last_val(run)
        run.set_marker("DONE", f"step {step}")
        return TrainResult("done", step, run.path, val_loss, entropy)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt):
            run.set_marker("FAILED", f"{type(e).__name__}: {e}")
        raise
    finally:
        if progress is not None:
            progress.close()
        logger.close()
        stop.restore()


def _last_val(run: RunDir) -> float | None:
    rows = run.read_metrics("val")
    return rows[-1]["val_loss"] if rows else None


def _progress(cfg: Config, start: int):
    if not cfg.train.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def _init_from(source: str, model: torch.nn.Module) -> None:
    """Load weights only from a run dir (its newest checkpoint) or a checkpoint dir."""
    path = Path(source)
    if (path / ckpt.COMPLETE).exists():
        target = path
    else:
        found = ckpt.latest_checkpoint(path / "checkpoints")
        if found is None:
            raise ConfigError("init_from", f"no complete checkpoint found at {source}")
        target = found[1]
    ckpt.load_model_weights(target, model)


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  cfg: Config) -> float:
    """Mean per-token validation loss over the fixed validation batches."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        x, y = b["input_ids"].to(device), b["labels"].to(device)
        doc_ids = b["doc_ids"].to(device) if cfg.model.doc_mask else None
        with autocast(device):
            logits, _ = model(x, doc_ids=doc_ids)
        ce, _ = lm_loss(logits, y)
        total += float(ce)
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


class MetricLogger:
    """metrics.jsonl rows, mirrored to TensorBoard / W&B when enabled (both off by default)."""

    def __init__(self, cfg: Config, run: RunDir):
        self.run = run
        self.t0 = time.perf_counter()
        self.tb = self.wandb = None
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ConfigError("log.tensorboard", f"needs the tensorboard package ({e})") from None
            self.tb = SummaryWriter(str(run.path / "tensorboard"))
        if cfg.log.wandb:
            try:
                import wandb
            except ImportError:
                raise ConfigError("log.wandb", "needs the wandb package (pip install wandb)") from None
            self.wandb = wandb.init(project=cfg.log.wandb_project or "ablate", name=cfg.name,
                                    dir=str(run.path), mode=cfg.log.wandb_mode, config=cfg.to_dict())

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, row: dict[str, Any]) -> None:
        self.run.log(row)
        scalars = {f"{row['kind']}/{k}": v for k, v in row.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, row["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
