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

import models
from models.context import LossTerm
from models.flops import flops_per_token
from models.loss import IGNORE_INDEX
from models.registry import ConfigError
from train import checkpoint as ckpt
from train.config import Config, config_drift, dump_config, resolve_config
from train.activation_schedule import apply_activation_schedule
from train.optim import build_optimizer, set_lr
from train.parallel import (DistInfo, check_same_config, init_distributed, make_backend, shutdown_distributed,
                            unwrap)
from train.rundir import RunDir, code_version
from train.schedule import lr_factor
from train.sparsity import ffn_sparsity_row

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
        state["cuda"] = torch.cuda.get_rng_state()       # the current device only: world sizes may change
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def objective_terms(losses: dict[str, LossTerm], n_targets: float, n_micro: float) -> dict[str, torch.Tensor]:
    """Each loss term's share of the step objective for one micro-batch on one rank.

    `sum` terms (CE, z-loss) are divided by the target tokens of the whole step, `mean` terms by
    the number of micro-batches in the step across all ranks (accumulation x data-parallel
    ranks); summed over micro-batches and ranks this is the whole step's mean objective."""
    return {name: t.value / (n_targets if t.reduction == "sum" else n_micro) for name, t in losses.items()}


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


def unigram_entropy(tokens: np.ndarray, max_tokens: int = 1 << 24) -> float:
    """Entropy (nats) of the token frequency distribution: what a context-free model reaches.

    Estimated from the first `max_tokens` tokens, so start-up stays cheap on a large corpus
    (exact for the quickstart's 1.6M tokens)."""
    counts = np.bincount(np.asarray(tokens[:max_tokens]))
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
    derived = saved.get("derived") or {"model.vocab_size": "tokenizer"}   # older runs: no record
    current = cfg.to_dict()
    for key in derived:          # still null here: resolve_config derives them the same way later
        *parents, leaf = key.split(".")
        mine, theirs = current, saved
        for part in parents:
            mine, theirs = mine.get(part, {}), theirs.get(part, {})
        if mine.get(leaf) is None:
            mine[leaf] = theirs.get(leaf)
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
    """Train (or resume) the run in `run_dir`; under torchrun every rank calls this."""
    device = resolve_device(cfg.device)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(cfg.parallel.backend, device.type, cfg.parallel.timeout_s,
                            cpu_collectives=cfg.parallel.cpu_offload)
    owns_group = info.distributed and not had_group     # a caller's process group stays up
    try:
        return _train(cfg, RunDir(run_dir), resume, info)
    finally:
        if owns_group:
            shutdown_distributed()


def _train(cfg: Config, run: RunDir, resume: bool, info: DistInfo) -> TrainResult:
    from train import data as data_mod     # data imports tokenizers / datasets: keep `import train` light

    main = info.is_main
    stop = StopRequest(run)
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    backend = make_backend(cfg, info, device)
    dp = info.world_size
    if cfg.train.global_batch % (cfg.train.micro_batch * dp):
        raise ConfigError("train.global_batch", f"global_batch={cfg.train.global_batch} is not a multiple of "
                          f"micro_batch x data-parallel ranks = {cfg.train.micro_batch} x {dp}")
    accum = cfg.train.global_batch // (cfg.train.micro_batch * dp)
    saved = prepare_run_dir(cfg, run, resume)

    data = data_mod.prepare_data(cfg, progress=cfg.train.progress and main)
    derived = {**((saved or {}).get("derived") or {}), **resolve_config(cfg, data.vocab_size)}
    if cfg.model.vocab_size < data.vocab_size:
        raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the tokenizer's "
                                              f"vocabulary ({data.vocab_size})")
    check_same_config(info, cfg.to_dict())
    logger = MetricLogger(cfg, run) if main else None     # fails early on a missing tensorboard / wandb
    try:
        return _loop(cfg, run, info, backend, data, data_mod, device, accum, stop, logger, derived)
    except BaseException as e:
        if not isinstance(e, KeyboardInterrupt) and run.path.is_dir() and (main or not run.has("FAILED")):
            run.set_marker("FAILED", f"{type(e).__name__}: {e}")     # any rank: the first cause wins
        raise
    finally:
        backend.close()               # DeepSpeed: engine.destroy() + gc before the group goes down
        if logger is not None:
            logger.close()
        stop.restore()


def _loop(cfg: Config, run: RunDir, info: DistInfo, backend, data, data_mod, device: torch.device, accum: int,
          stop: StopRequest, logger: "MetricLogger | None", derived: dict[str, str]) -> TrainResult:
    main, dp = info.is_main, info.world_size
    if main:
        ckpt.clean_partial(run.checkpoints)
    backend.barrier()

    seed_everything(cfg.seed)
    model = backend.wrap(build_model(cfg, device))
    optimizer = build_optimizer(model, cfg)
    fpt = flops_per_token(unwrap(model), cfg.data.seq_len)
    peak = peak_flops(cfg, device)
    spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_sigma)

    # ---- resume, or start (optionally from another run's full state or weights)
    start_step, sample_index = 0, 0
    latest = ckpt.latest_checkpoint(run.checkpoints)
    source = latest[1] if latest is not None else (_checkpoint_dir(cfg.branch_from, "branch_from")
                                                   if cfg.branch_from else None)
    if source is None and cfg.init_from:       # into the plain model, before any engine wraps it
        ckpt.load_model_weights(_checkpoint_dir(cfg.init_from, "init_from"), model)
    model = backend.setup(model, optimizer, accum)
    if source is not None:
        state = ckpt.load_checkpoint(source, model, optimizer, rank=info.rank, engine=backend.engine,
                                     world_size=dp)
        start_step, sample_index = state["step"], state["data"]["sample_index"]
        spikes.history = list(state.get("spike_history", []))
        set_rng_state(state["rng"])
    loader = data_mod.Loader(data.train, cfg.data.seq_len, cfg.train.micro_batch, cfg.data.seed,
                             rank=info.rank, world_size=dp, start_index=sample_index)
    val_data = data_mod.val_batches(data.val, cfg.data.seq_len, cfg.train.micro_batch, cfg.train.val_batches)
    entropy = unigram_entropy(data.train.tokens)

    # ---- setup succeeded: only now is the run dir touched
    if main:
        run.path.mkdir(parents=True, exist_ok=True)
        run.write_config(dump_config(cfg, {"derived": derived, "code_version": code_version()}))
        if data.tokenizer_dir is not None and not run.tokenizer_dir.exists():
            data_mod.copy_tokenizer(data, run.tokenizer_dir)
        run.truncate_metrics(start_step)
        run.clear_marker("STOP", "REQUEUE", "FAILED", "DONE")
        if source is not None:
            run.log({"kind": "event", "event": "resume" if latest is not None else "branch_from",
                     "step": start_step, "checkpoint": str(source), "world_size": dp})
        else:
            if cfg.init_from:
                run.log({"kind": "event", "event": "init_from", "step": 0, "source": cfg.init_from})
            run.log({"kind": "event", "event": "data", "step": 0, "train_tokens": int(len(data.train.tokens)),
                     "val_tokens": int(len(data.val.tokens)), "unigram_entropy": entropy,
                     "cache": data.cache_key})
    backend.barrier()
    stop.install()
    nan_steps = _test_nan_steps()
    tokens_per_step = cfg.train.global_batch * cfg.data.seq_len

    def log(row: dict[str, Any]) -> None:
        if logger is not None:
            logger.log(row)

    def save(step: int) -> None:
        saved = ckpt.save_checkpoint(run.checkpoints, step, model, optimizer,
                                     {"step": step, "data": loader.state_dict(), "tokens": step * tokens_per_step,
                                      "world_size": dp, "spike_history": list(spikes.history)},
                                     rng=rng_state(), rank=info.rank, barrier=backend.barrier, agree=backend.any,
                                     engine=backend.engine)
        if main:
            if not saved.get("existed"):
                log({"kind": "event", "event": "checkpoint", "step": step,
                     "seconds": round(saved["seconds"], 4), "bytes": saved["bytes"]})
            ckpt.prune(run.checkpoints, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every)
        backend.barrier()

    def nonfinite(step: int, loss_sum: float, grad_norm: float | None) -> None:
        """A skipped non-finite step (its gradients already dropped): halt or log it."""
        if cfg.train.nonfinite == "halt":
            raise FloatingPointError(f"non-finite loss ({loss_sum}) or grad norm ({grad_norm}) "
                                     f"at step {step} (train.nonfinite=halt)")
        log({"kind": "event", "event": "skip_nonfinite", "step": step,
             "loss": str(loss_sum), "grad_norm": str(grad_norm)})

    val_loss = None
    step = start_step
    progress = _progress(cfg, start_step) if main else None
    try:
        t_last, tokens_since = time.perf_counter(), 0
        while step < cfg.train.steps:
            if backend.any(stop.requested()):      # every rank stops at the same boundary
                save(step)
                if main:
                    run.set_marker("REQUEUE", f"stopped at step {step}")
                    run.clear_marker("STOP")
                return TrainResult("requeue", step, run.path, val_loss, entropy)

            factor = lr_factor(step, cfg.train.steps, cfg.optim.schedule)
            set_lr(optimizer, factor)
            lr = cfg.optim.lr * factor
            model.train()
            switch = apply_activation_schedule(model, step, cfg)     # ReLU fine-tune; stateless
            if switch is not None:
                log(switch)
            batches = [loader.next_batch() for _ in range(accum)]
            local_targets = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches)
            n_targets = max(backend.sum(local_targets), 1.0)
            terms: dict[str, float] = {}
            for i, b in enumerate(batches):
                x, y = b["input_ids"].to(device), b["labels"].to(device)
                doc_ids = b["doc_ids"].to(device) if cfg.model.doc_mask else None
                with backend.grad_sync(model, sync=i == len(batches) - 1):
                    with backend.autocast():
                        out = model(x, labels=y, doc_ids=doc_ids, sample_index=b["indices"].to(device),
                                    z_loss=cfg.train.z_loss)
                    parts = objective_terms(out.losses, n_targets, accum * dp)
                    # averaged gradients across ranks then equal the whole step's mean objective
                    loss = sum(parts.values()) * backend.grad_scale
                    if step + 1 in nan_steps:
                        loss = loss * float("nan")
                    backend.backward(model, loss)
                for name, value in parts.items():
                    terms[name] = terms.get(name, 0.0) + float(value.detach())
            terms = {name: backend.sum(v) for name, v in terms.items()}
            loss_sum = terms["ce"] if step + 1 not in nan_steps else float("nan")
            clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            grad_norm = backend.clip_grads(model, clip)     # None: clipped inside the backend's step
            step += 1
            spike = spikes.is_spike(loss_sum)
            if not (math.isfinite(loss_sum) and (grad_norm is None or math.isfinite(grad_norm))):
                backend.discard_grads(model, optimizer)
                nonfinite(step, loss_sum, grad_norm)
            elif spike and cfg.train.spike_action == "skip":
                backend.discard_grads(model, optimizer)
                log({"kind": "event", "event": "spike", "step": step, "loss": loss_sum, "skipped": True})
            else:
                if spike:
                    log({"kind": "event", "event": "spike", "step": step, "loss": loss_sum, "skipped": False})
                step_norm = backend.optimizer_step(model, optimizer)
                if grad_norm is None:
                    grad_norm = step_norm
                if grad_norm is not None and not math.isfinite(grad_norm):
                    nonfinite(step, loss_sum, grad_norm)     # DeepSpeed: its overflow check skipped the update
                else:
                    spikes.update(loss_sum)
            tokens_since += tokens_per_step
            samples = [step * cfg.train.global_batch - cfg.train.global_batch, step * cfg.train.global_batch - 1]
            if dp == 1:     # the loader's own record of what it consumed
                samples = [int(batches[0]["indices"][0]), int(batches[-1]["indices"][-1])]

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                now = time.perf_counter()
                tps = tokens_since / max(now - t_last, 1e-9)
                t_last, tokens_since = now, 0
                log({"kind": "train", "step": step, "tokens": step * tokens_per_step,
                     "loss": loss_sum, **{f"loss_{k}": v for k, v in terms.items() if k != "ce"},
                     "loss_total": sum(terms.values()), "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tps,
                     "mfu": (tps * fpt / peak) if peak else None, "mem_gb": memory_gb(device),
                     "time_s": logger.elapsed() if logger else None, "samples": samples})
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}")

            if val_data and ((cfg.train.val_every and step % cfg.train.val_every == 0) or step == cfg.train.steps):
                val_loss = evaluate_loss(model, val_data, device, cfg, backend)
                log({"kind": "val", "step": step, "tokens": step * tokens_per_step,
                     "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))})
                sparsity = ffn_sparsity_row(model, val_data[:1], step, device, backend.autocast)
                if sparsity is not None:
                    log(sparsity)
            if cfg.eval.every and cfg.eval.tasks:      # lm-eval: every rank, in lockstep; state left as found
                from eval.hook import run_in_training_eval
                run_in_training_eval(model, cfg, run, step, device, val_data=data.val, log=log)
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < cfg.train.steps:
                save(step)

        save(step)
        if val_loss is None:
            val_loss = _last_val(run)
        if main:
            run.set_marker("DONE", f"step {step}")
        return TrainResult("done", step, run.path, val_loss, entropy)
    finally:
        if progress is not None:
            progress.close()


class SpikeDetector:
    """A loss above mean + sigma * std of the last `window` accepted losses is a spike."""

    def __init__(self, window: int, sigma: float):
        self.window, self.sigma = window, sigma
        self.history: list[float] = []

    def is_spike(self, loss: float) -> bool:
        if self.window <= 0 or len(self.history) < self.window or not math.isfinite(loss):
            return False
        mean = sum(self.history) / len(self.history)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
        return loss > mean + self.sigma * max(std, 1e-8)

    def update(self, loss: float) -> None:
        if self.window > 0:
            self.history = (self.history + [loss])[-self.window:]


def _last_val(run: RunDir) -> float | None:
    rows = run.read_metrics("val")
    return rows[-1]["val_loss"] if rows else None


def _progress(cfg: Config, start: int):
    if not cfg.train.progress:
        return None
    from tqdm import tqdm
    return tqdm(total=cfg.train.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                file=sys.stderr, mininterval=1.0)


def _checkpoint_dir(source: str, key: str) -> Path:
    """A checkpoint dir, or a run dir's newest complete checkpoint (for init_from / branch_from)."""
    path = Path(source)
    if (path / ckpt.COMPLETE).exists():
        return path
    found = ckpt.latest_checkpoint(path / "checkpoints")
    if found is None:
        raise ConfigError(key, f"no complete checkpoint found at {source}")
    return found[1]


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  cfg: Config, backend=None) -> float:
    """Mean per-token validation loss over the fixed validation batches (every rank runs all of
    them in lockstep: FSDP2 needs each rank in each forward)."""
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        x, y = b["input_ids"].to(device), b["labels"].to(device)
        doc_ids = b["doc_ids"].to(device) if cfg.model.doc_mask else None
        with (backend.autocast() if backend is not None else autocast(device)):
            out = model(x, labels=y, doc_ids=doc_ids, sample_index=b["indices"].to(device))
        total += float(out.losses["ce"].value)
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total / max(count, 1)


class MetricLogger:
    """metrics.jsonl rows, mirrored to TensorBoard / W&B when enabled (both off by default).

    The optional packages are checked at construction (before the run dir is touched); their
    writers are opened on the first row."""

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run = cfg, run
        self.t0 = time.perf_counter()
        self.tb = self.wandb = None
        self._opened = False
        if cfg.log.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401
            except ImportError as e:
                raise ConfigError("log.tensorboard", f"needs the tensorboard package ({e})") from None
        if cfg.log.wandb:
            try:
                import wandb  # noqa: F401
            except ImportError:
                raise ConfigError("log.wandb", "needs the wandb package (pip install wandb)") from None

    def _open(self) -> None:
        self._opened = True
        if self.cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.run.path / "tensorboard"))
        if self.cfg.log.wandb:
            import wandb
            self.wandb = wandb.init(project=self.cfg.log.wandb_project or "ablate", name=self.cfg.name,
                                    dir=str(self.run.path), mode=self.cfg.log.wandb_mode, config=self.cfg.to_dict())

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def log(self, row: dict[str, Any]) -> None:
        if not self._opened:
            self._open()
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
