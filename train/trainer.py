"""The trainer: setup, one reusable `train_step`, and the loop, each readable top to bottom.

    train(cfg, run_dir)                       a run: setup, loop, checkpoints, resume, stop/requeue
    t = Trainer(cfg); t.build()               the real step without a run dir (bench, coordcheck):
    metrics = t.train_step(batches)           forward/backward of each micro-batch, clip, guard, update

The step: count the step's target tokens on the host, forward each micro-batch with its labels
(the model returns named loss terms), weight each term by its reduction so that the averaged
gradients equal the whole step's mean objective, backward, clip, read the device once (losses
and grad norm), then update or skip (non-finite, spike). Everything around the step that a
technique or a policy adds (activation schedules, probes, lm-eval in the loop, when to
checkpoint, profiling) is a callback (train/callbacks); the trainer never changes for one.
"""
from __future__ import annotations

import contextlib
import math
import resource
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.distributed.checkpoint.api import CheckpointException

import models
from models.context import LossTerm
from models.flops import count_params, flops_per_token
from models.loss import IGNORE_INDEX
from models.registry import ConfigError
from train import checkpoint as ckpt
from train.callbacks import Callback, TrainState, default_callbacks
from train.config import Config, config_drift, dump_config, resolve_config
from train.console import Console, interactive
from train.group_stats import GroupStats
from train.optim import build_optimizer, set_lr
from train.parallel import DistInfo, check_same_config, init_distributed, make_backend, shutdown_distributed
from train.rundir import RunDir, code_version
from train.runlock import RunLock
from train.runtime import any_rank, autocast, resolve_device, rng_state, seed_everything, set_rng_state, unwrap
from train import signals
from train.schedule import lr_factor

# Nominal dense bf16 peak, TFLOP/s, by a substring of the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


# ----------------------------------------------------------------------------- helpers
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


def objective_terms(losses: dict[str, LossTerm], n_targets: float | torch.Tensor,
                    n_micro: float) -> dict[str, torch.Tensor]:
    """Each loss term's share of the step objective for one micro-batch on one rank.

    `sum` terms (CE, z-loss) are divided by the target tokens of the whole step, `mean` terms by
    the number of micro-batches in the step across all ranks (accumulation x data-parallel
    ranks); summed over micro-batches and ranks this is the whole step's mean objective."""
    return {name: t.value / (n_targets if t.reduction == "sum" else n_micro) for name, t in losses.items()}


def install_stop_handlers() -> None:
    """For processes that exist to train (the CLI): flag-only SIGTERM / SIGUSR1 handlers for the
    whole process lifetime (the entry points install them before any heavy import)."""
    signals.install()


class StopRequest:
    """SIGTERM / SIGUSR1 or a STOP file -> checkpoint at the next step boundary and requeue."""

    def __init__(self, run: RunDir):
        self.run = run
        self._old: dict[int, Any] = {}

    def install(self) -> None:
        if signals.installed():       # an entry point's handlers: keep a signal that came early
            return
        signals.reset()               # a fresh in-process run (tests, notebooks)
        for sig in signals.STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, signals.on_signal)
            except ValueError:    # not the main thread (e.g. inside a test runner thread)
                pass

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def requested(self) -> bool:
        return signals.requested() or self.run.has("STOP")


@dataclass
class TrainResult:
    status: str                    # "done" | "requeue" | "failed"
    step: int
    run_dir: Path
    val_loss: float | None = None
    unigram_entropy: float | None = None    # nats/token of the training tokens: the bar to beat
    skipped_steps: int = 0                  # non-finite steps skipped (no update)


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


def prepare_run_dir(cfg: Config, run: RunDir, resume: bool) -> dict[str, Any] | None:
    """Check a resumed run's saved config; returns it (None for a new run)."""
    if run.exists():
        saved = run.read_config()
    else:                   # config.yaml deleted: the checkpoints' own copy still guards the resume
        saved = _checkpoint_config(run)
        if saved is None:
            if resume:
                raise ConfigError("--resume", f"no run to resume at {run.path} (no config.yaml)")
            return None
    derived = saved.get("derived") or {"model.vocab_size": "tokenizer"}   # older runs: no record
    current = cfg.to_dict()
    for key in derived:          # still null here: resolve_config derives them the same way later
        *parents, leaf = key.split(".")
        mine, theirs = current, saved
        for part in parents:
            mine, theirs = mine.get(part, {}), theirs.get(part, {})
        if mine.get(leaf) is None:
            mine[leaf] = theirs.get(leaf)
    drift = config_drift({k: v for k, v in saved.items() if k != "code_version"}, current)
    if drift:
        raise ConfigError("", f"the config differs from the one saved in {run.config_path} in keys that "
                              f"cannot change on resume:\n  " + "\n  ".join(drift)
                          + "\nUse another --run-dir for a new run.")
    return saved


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
             cfg: Config, backend: Any = None, metrics: Any = None) -> tuple[float, dict[str, float]]:
    """Mean per-token CE over fixed validation batches and the source's metrics from the logits
    (`metrics(logits, batch) -> {name: (sum, count)}`, None: no logits are made). The losses are
    read from the device once. Under FSDP2 every rank runs all of them in lockstep."""
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    sums: dict[str, list[float]] = {}
    for b in batches:
        with (backend.autocast() if backend is not None else autocast(device)):
            out = model(**batch_inputs(b, device, cfg.model.doc_mask), return_logits=metrics is not None)
        total += out.losses["ce"].value.double()
        count += int((b["labels"] != IGNORE_INDEX).sum())
        if metrics is not None:
            for name, (value, n) in metrics(out.logits, b).items():
                acc = sums.setdefault(name, [0.0, 0])
                acc[0], acc[1] = acc[0] + float(value), acc[1] + int(n)
    model.train()
    return float(total) / max(count, 1), {name: v / max(n, 1) for name, (v, n) in sums.items()}


def evaluate_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device,
                  cfg: Config, backend: Any = None) -> float:
    """Mean per-token CE over fixed validation batches (see `evaluate`)."""
    return evaluate(model, batches, device, cfg, backend)[0]


def batch_inputs(batch: dict[str, torch.Tensor], device: torch.device, doc_mask: bool) -> dict[str, Any]:
    """The forward's keyword arguments for one loader batch, on the device."""
    nb = device.type == "cuda"      # the prefetcher pins host memory, so the copy overlaps compute
    return {"input_ids": batch["input_ids"].to(device, non_blocking=nb),
            "labels": batch["labels"].to(device, non_blocking=nb),
            "doc_ids": batch["doc_ids"].to(device, non_blocking=nb) if doc_mask else None,
            "sample_index": batch["indices"].to(device, non_blocking=nb)}


def train_device(cfg: Config, info: DistInfo) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _checkpoint_config(run: RunDir) -> dict[str, Any] | None:
    """The config saved inside the run's newest complete checkpoint (None without one)."""
    latest = ckpt.latest_checkpoint(run.checkpoints)
    if latest is None:
        return None
    try:
        state = torch.load(latest[1] / ckpt.TRAINER_STATE, weights_only=False)
    except Exception:        # noqa: BLE001 - damaged: the resume itself will report it
        return None
    config = state.get("config") if isinstance(state, dict) else None
    return dict(config) if isinstance(config, dict) else None


def _checkpoint_dir(source: str, key: str) -> Path:
    """A checkpoint dir, or a run dir's newest complete checkpoint (for init_from / branch_from)."""
    path = Path(source)
    if (path / ckpt.COMPLETE).exists():
        return path
    found = ckpt.latest_checkpoint(path / "checkpoints")
    if found is None:
        raise ConfigError(key, f"no complete checkpoint found at {source}")
    return found[1]


# ----------------------------------------------------------------------------- the trainer
class Trainer:
    """One run's training. `run_dir=None`: no metrics file and no checkpoints (bench, coordcheck)."""

    def __init__(self, cfg: Config, run_dir: str | Path | None = None, *, callbacks: Sequence[Callback] = (),
                 info: DistInfo | None = None, resume: bool = False):
        self.cfg, self.resume = cfg, resume
        self.run = RunDir(run_dir) if run_dir is not None else None
        self.info = info or DistInfo()
        self.device = train_device(cfg, self.info)
        self.backend = make_backend(cfg, self.info, self.device)
        self.callbacks = list(callbacks)
        dp = self.info.world_size
        if cfg.train.global_batch % (cfg.train.micro_batch * dp):
            raise ConfigError("train.global_batch", f"global_batch={cfg.train.global_batch} is not a multiple of "
                              f"micro_batch x data-parallel ranks = {cfg.train.micro_batch} x {dp}")
        self.accum = cfg.train.global_batch // (cfg.train.micro_batch * dp)
        self.spikes = SpikeDetector(cfg.train.spike_window, cfg.train.spike_sigma)
        self.skipped_total = 0          # non-finite steps skipped in the whole run
        self.consecutive_skips = 0      # ... in a row, up to now (train.max_skipped_steps halts)
        self.logger: MetricLogger | None = None
        self.pending: ckpt.PendingSave | None = None     # an async checkpoint still being written
        self.async_group: Any = False                     # False: synchronous saves
        self.model: torch.nn.Module | None = None
        self.state: TrainState | None = None
        self.t0 = time.perf_counter()
        self.time_offset = 0.0          # the resumed checkpoint's time_s: time_s continues across segments
        self.batches: Any = None          # the Prefetcher (train/data/prefetch.py), built in setup
        self.console: Console | None = None

    def elapsed(self) -> float:
        """Wall time of the whole run: earlier segments (from the checkpoint) plus this process's."""
        return self.time_offset + time.perf_counter() - self.t0

    def log(self, row: dict[str, Any]) -> None:
        if self.logger is not None:
            self.logger.log(row)

    # ---- setup ------------------------------------------------------------------------
    def build(self, init_from: str | None = None) -> TrainState:
        """Model -> parallelism (AC, compile, FSDP2 / DDP) -> optimizer (-> init_from weights)
        -> backend setup (DeepSpeed's engine). Needs a resolved config (vocab size)."""
        cfg = self.cfg
        if cfg.model.vocab_size is None:
            resolve_config(cfg)
        seed_everything(cfg.seed)
        model = self.backend.build(lambda: models.Decoder(cfg.model, init_seed=cfg.seed))
        optimizer = build_optimizer(model, cfg)
        self.init_report = None
        if init_from:                  # into the built (FSDP2: sharded) model, before any engine wraps it
            self.init_report = ckpt.init_from_checkpoint(
                _checkpoint_dir(init_from, "init_from"), model,
                [*cfg.init_from_allow_new, *unwrap(model).init_from_fresh()], cfg.init_from_allow_unused,
                unwrap(model).init_from_aliases())
        self.model = self.backend.setup(model, optimizer, self.accum)
        self.optimizer = optimizer
        self.group_stats = GroupStats(optimizer) if cfg.train.log_group_norms else None
        self.state = TrainState(cfg=cfg, model=unwrap(self.model), optimizer=optimizer, backend=self.backend,
                                run=self.run, log=self.log, device=self.device)
        return self.state

    def prepare(self) -> None:
        """Config checks and data: a failure here leaves the run dir untouched (no FAILED marker)."""
        from train import data as data_mod     # data imports tokenizers / datasets: keep `import train` light

        cfg, run, info, main = self.cfg, self.run, self.info, self.info.is_main
        saved = prepare_run_dir(cfg, run, self.resume)
        self.first_code_version = (saved or {}).get("code_version")     # config.yaml keeps the first segment's
        bars = cfg.train.progress and main and interactive()             # no tokenizer bars in a log file
        self.data = data_mod.prepare_data(cfg, progress=bars)
        self.val_data = data_mod.prepare_val_sets(cfg, self.data, progress=bars)
        self.derived = {**((saved or {}).get("derived") or {}),
                        **resolve_config(cfg, self.data.vocab_size, self.data.eos_id)}
        if cfg.model.vocab_size < self.data.vocab_size:
            raise ConfigError("model.vocab_size", f"{cfg.model.vocab_size} is smaller than the data's "
                                                  f"vocabulary ({self.data.vocab_size})")
        check_same_config(info, cfg.to_dict())
        self.logger = MetricLogger(cfg, run) if main else None   # fails early on a missing tensorboard / wandb

    def setup(self) -> None:
        """Model, optimizer and resume; the run dir is written only once all of it succeeded."""
        from train import data as data_mod

        cfg, run, info, main, data = self.cfg, self.run, self.info, self.info.is_main, self.data
        if main:
            ckpt.clean_partial(run.checkpoints)
        self.backend.barrier()
        if cfg.checkpoint.async_save:      # its own gloo group: background writes never meet the step's collectives
            self.async_group = torch.distributed.new_group(backend="gloo") if self.backend.distributed else None

        # resume from the newest complete checkpoint that loads, or start (optionally from
        # another run's full state or weights)
        resumable = [p for _, p in reversed(ckpt.complete_checkpoints(run.checkpoints))]
        sources = resumable or ([_checkpoint_dir(cfg.branch_from, "branch_from")] if cfg.branch_from else [])
        state = self.build(init_from=cfg.init_from if not sources else None)
        source, sample_index, unusable = self._resume(sources)
        if state.step > cfg.train.steps:
            raise ConfigError("train.steps", f"the run in {run.path} is at step {state.step}; train.steps="
                                             f"{cfg.train.steps} is below it (raise it to extend the run, or start "
                                             "a new run from an earlier checkpoint with branch_from)")
        restarted = self._restart_without_checkpoint() if source is None and main else None
        loader = data_mod.Loader(data.train_samples(cfg.data.seq_len, cfg.data.seed), cfg.train.micro_batch,
                                 rank=info.rank, world_size=info.world_size, start_index=sample_index)
        self.batches = data_mod.Prefetcher(loader, self.accum, self.device)
        state.data = data
        state.val_sets = {name: data_mod.fixed_batches(ds.val_samples(cfg.data.seq_len), cfg.train.micro_batch,
                                                       cfg.train.val_batches) for name, ds in self.val_data.items()}
        state.val_batches = next(iter(state.val_sets.values()), [])
        summary = data.summary()
        self.entropy = summary.get("unigram_entropy")
        version = code_version()

        # setup succeeded: only now is the run dir touched
        if main:
            run.path.mkdir(parents=True, exist_ok=True)
            run.write_config(dump_config(cfg, {"derived": self.derived,
                                               "code_version": self.first_code_version or version}))
            if data.tokenizer_dir is not None and not run.tokenizer_dir.exists():
                data_mod.copy_tokenizer(data, run.tokenizer_dir)
            run.truncate_metrics(state.step)
            run.clear_marker("STOP", "REQUEUE", "FAILED", "DONE")
            for row in unusable:            # after the truncation, so the record stays
                self.log({**row, "step": state.step})
            if restarted is not None:
                self.log({"kind": "event", "event": "restart", "step": 0, "previous_last_step": restarted})
            if source is not None:
                self.log({"kind": "event", "event": "resume" if resumable else "branch_from",
                          "step": state.step, "checkpoint": str(source), "world_size": info.world_size,
                          "code_version": version})
            else:
                if cfg.init_from:
                    self.log({"kind": "event", "event": "init_from", "step": 0, "source": cfg.init_from,
                              **(self.init_report or {})})
                self.log({"kind": "event", "event": "data", "step": 0, "source": cfg.data.source, **summary,
                          "val_sets": {name: sum(len(b["indices"]) for b in batches)
                                       for name, batches in state.val_sets.items()}})
            self.log(self.model_event())
            if cfg.model.entropy_reg.weight > 0 and cfg.model.norm.block != "none":
                note = (f"model.entropy_reg is on with model.norm.block={cfg.model.norm.block}: allowed, but the "
                        "regulariser is meant for LN-free models (norm.block: none)")
                print(f"ablate: note: {note}", file=sys.stderr)
                self.log({"kind": "event", "event": "note", "step": state.step, "message": note})
        self.backend.barrier()

    def model_event(self) -> dict[str, Any]:
        """The `model` event of a segment start: parameters, FLOPs/token and each layer's kernels."""
        model, cfg = self.state.model, self.cfg
        counts = count_params(model)
        dtype = {"bf16": "bf16", "fp32": "fp32"}.get(cfg.parallel.param_dtype) or \
            ("bf16" if self.device.type == "cuda" else "fp32")
        return {"kind": "event", "event": "model", "step": self.state.step,
                "params": {"total": counts.total, "embedding": counts.embedding,
                           "non_embedding": counts.non_embedding, "matmul": counts.matmul,
                           "memory_values": counts.memory_values},
                "flops_per_token": flops_per_token(model, cfg.data.seq_len), "seq_len": cfg.data.seq_len,
                "param_kind": cfg.model.param.kind, "device": str(self.device), "world_size": self.info.world_size,
                "dtype": dtype, "layers": model.layer_summary(),
                # CPU fp32 results depend on the intra-op thread count (a --parallel sweep splits the cores)
                "cpu_threads": torch.get_num_threads()}

    def _resume(self, sources: list[Path]) -> tuple[Path | None, int, list[dict[str, Any]]]:
        """Load the first of `sources` that verifies and loads; returns (its path or None, the
        data position, event rows for the ones that did not). None of them loading is an error."""
        unusable = []
        for path in sources:
            try:
                saved = self._load_checkpoint(path)
            except ConfigError:
                raise                   # a setting that cannot resume it (DeepSpeed world size): not damage
            except (Exception, CheckpointException) as e:        # DCP's is a BaseException
                unusable.append({"kind": "event", "event": "checkpoint_unusable", "step": 0,
                                 "checkpoint": str(path), "error": f"{type(e).__name__}: {e}"[:2000]})
                continue
            self.state.step = saved["step"]
            self.time_offset = float(saved.get("time_s", 0.0))
            self.spikes.history = list(saved.get("spike_history", []))
            self.skipped_total = saved.get("skipped_steps", 0)
            self.consecutive_skips = saved.get("consecutive_skips", 0)
            for cb in self.callbacks:
                cb.load_state_dict(saved.get("callbacks", {}).get(cb.name, {}))
            set_rng_state(saved["rng"])
            return path, saved["data"]["sample_index"], unusable
        if sources:
            raise ckpt.UnusableCheckpoint(f"no checkpoint of {self.run.path} could be loaded: "
                                          + "; ".join(u["error"] for u in unusable))
        return None, 0, unusable

    def _restart_without_checkpoint(self) -> int | None:
        """A run dir with metrics but no checkpoint to resume them from starts over: say so, keep
        the old rows aside, and return their last step (None when there is no such history)."""
        run = self.run
        done = [r["step"] for r in run.read_metrics("train")] if run.exists() else []
        if not done or max(done) == 0:
            return None
        shutil.copyfile(run.metrics_path, run.path / "metrics.before-restart.jsonl")
        print(f"ablate: warning: {run.path} has metrics up to step {max(done)} but no complete checkpoint: "
              "starting over from step 0 (the old rows are kept in metrics.before-restart.jsonl)", file=sys.stderr)
        return max(done)

    def _load_checkpoint(self, path: Path) -> dict[str, Any]:
        """Verify (rank 0, checksums; `checkpoint.verify`) then load one checkpoint on every rank."""
        failed = None
        if self.cfg.checkpoint.verify and self.info.is_main:
            try:
                ckpt.verify_checkpoint(path)
            except ckpt.CheckpointDamaged as e:
                failed = e
        if self.backend.any(failed is not None):
            raise failed or ckpt.CheckpointDamaged(path, "?", "rank 0 found it damaged")
        return ckpt.load_checkpoint(path, self.model, self.optimizer, rank=self.info.rank,
                                    engine=self.backend.engine, world_size=self.info.world_size)

    # ---- the step ---------------------------------------------------------------------
    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> dict[str, Any]:
        """One optimizer update over this rank's micro-batches of the step.

        Returns the step's metrics (all ranks): loss (CE per target token), loss_<term> for
        every other term, loss_total, grad_norm, lr, and `update`: applied | skipped_nonfinite |
        skipped_spike. The device is read once (losses and grad norm together)."""
        cfg, backend, model, st = self.cfg, self.backend, self.model, self.state
        factor = lr_factor(st.step, cfg.train.steps, cfg.optim.schedule)
        set_lr(self.optimizer, factor)
        model.train()
        # counted on the host batches (numpy: no tensor op, no device read)
        local_targets = sum(int(np.count_nonzero(b["labels"].numpy() != IGNORE_INDEX)) for b in batches)
        if backend.distributed:          # summed on the device: no host read here
            n_targets = backend.all_sum(torch.tensor(float(local_targets), dtype=torch.float64))
            n_targets = n_targets.clamp_min(1.0).to(self.device)
        else:
            n_targets = float(max(local_targets, 1))
        terms: dict[str, torch.Tensor] = {}
        for i, b in enumerate(batches):
            with backend.grad_sync(model, sync=i == len(batches) - 1):
                with backend.autocast():
                    out = model(**batch_inputs(b, self.device, cfg.model.doc_mask), z_loss=cfg.train.z_loss)
                parts = objective_terms(out.losses, n_targets, self.accum * self.info.world_size)
                # averaged gradients across ranks then equal the whole step's mean objective
                backend.backward(model, sum(parts.values()) * backend.grad_scale)
            for name, value in parts.items():
                terms[name] = terms.get(name, 0.0) + value.detach().double()
        names = sorted(terms)
        sums = backend.all_sum(torch.stack([terms[n] for n in names]))
        clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = backend.clip_grads(model, clip)     # a tensor, or None: clipped inside the backend's step
        if self.group_stats is not None and self._log_due(st.step + 1):
            self.group_stats.before_step()
        host = torch.cat([sums, grad_norm.reshape(1).to(sums)]) if grad_norm is not None else sums
        values = host.tolist()                          # the one host sync of the step
        losses = dict(zip(names, values))
        norm = values[-1] if grad_norm is not None else None

        st.step += 1
        metrics: dict[str, Any] = {"loss": losses["ce"], **{f"loss_{k}": v for k, v in losses.items() if k != "ce"},
                                   "loss_total": sum(losses.values()), "lr": cfg.optim.lr * factor,
                                   "grad_norm": norm, "update": "applied"}
        spike = self.spikes.is_spike(metrics["loss"])
        if not (math.isfinite(metrics["loss_total"]) and (norm is None or math.isfinite(norm))):
            backend.discard_grads(model, self.optimizer)
            metrics["update"] = "skipped_nonfinite"
            self._nonfinite(metrics)
        elif spike and cfg.train.spike_action == "skip":
            backend.discard_grads(model, self.optimizer)
            metrics["update"] = "skipped_spike"
            self.log({"kind": "event", "event": "spike", "step": st.step, "loss": metrics["loss"], "skipped": True})
        else:
            if spike:
                self.log({"kind": "event", "event": "spike", "step": st.step, "loss": metrics["loss"],
                          "skipped": False})
            step_norm = backend.optimizer_step(model, self.optimizer)
            if metrics["grad_norm"] is None:
                metrics["grad_norm"] = step_norm
            if metrics["grad_norm"] is not None and not math.isfinite(metrics["grad_norm"]):
                metrics["update"] = "skipped_nonfinite"    # DeepSpeed: its overflow check skipped the update
                self._nonfinite(metrics)
            else:
                self.spikes.update(metrics["loss"])
                self.consecutive_skips = 0
            if self.group_stats is not None and self._log_due(st.step):
                metrics.update(self.group_stats.after_step())    # one more read, on log steps only
        return metrics

    def _nonfinite(self, metrics: dict[str, Any]) -> None:
        """A skipped non-finite step (its gradients already dropped): halt or log it."""
        step, t = self.state.step, self.cfg.train
        if t.nonfinite == "halt":
            raise FloatingPointError(f"non-finite loss ({metrics['loss_total']}) or grad norm "
                                     f"({metrics['grad_norm']}) at step {step} (train.nonfinite=halt)")
        self.skipped_total += 1
        self.consecutive_skips += 1
        self.log({"kind": "event", "event": "skip_nonfinite", "step": step,
                  "loss": str(metrics["loss_total"]), "grad_norm": str(metrics["grad_norm"])})
        if t.max_skipped_steps and self.consecutive_skips >= t.max_skipped_steps:
            raise FloatingPointError(f"the run diverged: {self.consecutive_skips} consecutive non-finite steps "
                                     f"skipped up to step {step} (train.max_skipped_steps={t.max_skipped_steps}); "
                                     "lower optim.lr or resume from an earlier checkpoint")

    def _log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    # ---- validation and checkpoints -------------------------------------------------------
    def validate(self) -> list[dict[str, Any]]:
        """One `val` row per validation set (the held-out split first), with the source's metrics."""
        st, tokens = self.state, self.state.step * self.cfg.train.global_batch * self.cfg.data.seq_len
        rows = []
        for name, batches in st.val_sets.items():
            if not batches:
                continue
            ds = self.val_data[name]
            loss, extra = evaluate(self.model, batches, self.device, self.cfg, self.backend,
                                   metrics=ds.val_metrics if ds.val_metric_names else None)
            rows.append({"kind": "val", "step": st.step, "tokens": tokens, "set": name, "val_loss": loss,
                         "val_ppl": math.exp(min(loss, 50.0)), **{f"val_{k}": v for k, v in extra.items()}})
        return rows

    def save(self, wait: bool = False) -> None:
        """An atomic checkpoint of the whole state at this step boundary (then the keep policy).

        With `checkpoint.async_save` the state is copied to CPU memory and written in the
        background (at most one save in flight; `finish_pending` completes it at a later
        boundary); `wait` (a stop, the end) writes it before returning."""
        self.finish_pending()
        st, info = self.state, self.info
        tokens_per_step = self.cfg.train.global_batch * self.cfg.data.seq_len
        trainer_state = {"step": st.step, "data": self.batches.state_dict(), "tokens": st.step * tokens_per_step,
                         "time_s": self.elapsed(),
                         "world_size": info.world_size, "spike_history": list(self.spikes.history),
                         "skipped_steps": self.skipped_total, "consecutive_skips": self.consecutive_skips,
                         "config": {**self.cfg.to_dict(), "derived": self.derived},
                         "callbacks": {cb.name: cb.on_checkpoint(st) for cb in self.callbacks}}
        saved = ckpt.save_checkpoint(self.run.checkpoints, st.step, self.model, self.optimizer, trainer_state,
                                     rng=rng_state(), rank=info.rank, barrier=self.backend.barrier,
                                     agree=self.backend.any, engine=self.backend.engine,
                                     async_group=False if wait else self.async_group)
        if isinstance(saved, ckpt.PendingSave):
            self.pending = saved
        else:
            self._saved(st.step, saved)

    def finish_pending(self, poll: bool = False) -> None:
        """Complete the save in flight, every rank in lockstep; with `poll` only once every
        rank's background write has finished (else it waits for them)."""
        if self.pending is None or (poll and self.backend.any(not self.pending.future.done())):
            return
        pending, self.pending = self.pending, None
        self._saved(pending.step, ckpt.finish_save(pending, self.info.rank, self.backend.barrier))

    def _saved(self, step: int, saved: dict[str, Any]) -> None:
        if self.info.is_main:
            if not saved.get("existed"):
                self.log({"kind": "event", "event": "checkpoint", "step": step,
                          "seconds": round(saved["seconds"], 4), "bytes": saved["bytes"],
                          "checksum_seconds": round(saved.get("checksum_seconds", 0.0), 4),
                          "blocking_seconds": round(saved.get("blocking_seconds", saved["seconds"]), 4)})
            ckpt.prune(self.run.checkpoints, self.cfg.checkpoint.keep_last, self.cfg.checkpoint.keep_every)
        self.backend.barrier()

    # ---- the loop -----------------------------------------------------------------------
    def fit(self) -> TrainResult:
        """Train to `train.steps` (or until a stop request), from wherever the run dir left off."""
        run, main = self.run, self.info.is_main
        stop = StopRequest(run)
        try:
            self.prepare()
            try:
                self.setup()
                stop.install()
                return self._loop(stop)
            except BaseException as e:
                # a config refusal leaves the run as it was: it did not fail, it was not run
                if (not isinstance(e, (KeyboardInterrupt, ConfigError)) and run.exists()
                        and (main or not run.has("FAILED"))):
                    try:
                        run.set_marker("FAILED", f"{type(e).__name__}: {e}")     # any rank: the first cause wins
                    except OSError as marker_error:       # a read-only or full disk: keep the real cause
                        print(f"ablate: warning: could not write {run.marker('FAILED')}: {marker_error}",
                              file=sys.stderr)
                raise
        finally:
            self.backend.close()       # DeepSpeed: engine.destroy() + gc before the group goes down
            if self.logger is not None:
                self.logger.close()
            stop.restore()

    def _loop(self, stop: StopRequest) -> TrainResult:
        cfg, st, run, main = self.cfg, self.state, self.run, self.info.is_main
        tokens_per_step = cfg.train.global_batch * cfg.data.seq_len
        fpt = flops_per_token(st.model, cfg.data.seq_len)
        peak = peak_flops(cfg, self.device)
        self.console = console = Console(cfg.train.progress and main, cfg.train.steps, st.step)
        val_loss, step_seconds, steps_timed = None, 0.0, 0
        window = {"val_s": 0.0, "eval_s": 0.0, "ckpt_s": 0.0}    # time outside the steps since the last row
        try:
            while st.step < cfg.train.steps:
                with _timed(window, "ckpt_s"):
                    self.finish_pending(poll=True)              # an async save whose writes all finished
                if self.backend.any(stop.requested()):      # every rank stops at the same boundary
                    self.save(wait=True)
                    if main:
                        run.set_marker("REQUEUE", f"stopped at step {st.step}")
                        run.clear_marker("STOP")
                    return TrainResult("requeue", st.step, run.path, val_loss, self.entropy)

                for cb in self.callbacks:
                    cb.on_step_start(st)
                t0 = time.perf_counter()
                batches = self.batches.next_step()          # the next step's start preparing now
                metrics = self.train_step(batches)
                step_seconds, steps_timed = step_seconds + time.perf_counter() - t0, steps_timed + 1

                if self._log_due(st.step):       # throughput of the steps alone (not validation, eval or saves);
                    # tokens/s is the whole job's, MFU per device (peak is one device's)
                    tps = steps_timed * tokens_per_step / max(step_seconds, 1e-9)
                    step_seconds, steps_timed = 0.0, 0
                    row = {"kind": "train", "step": st.step, "tokens": st.step * tokens_per_step,
                           **{k: v for k, v in metrics.items() if k != "update"},
                           "tokens_per_s": tps, "mfu": (tps * fpt / (peak * self.info.world_size)) if peak else None,
                           "mem_gb": memory_gb(self.device), "time_s": self.elapsed(),
                           **{k: round(v, 4) for k, v in window.items()}, "samples": self._samples(batches)}
                    window = dict.fromkeys(window, 0.0)
                    self.log(row)
                    console.train_row(row)
                console.step(metrics)

                if any(st.val_sets.values()) and ((cfg.train.val_every and st.step % cfg.train.val_every == 0)
                                       or st.step == cfg.train.steps):
                    with _timed(window, "val_s"):
                        rows = self.validate()
                        for row in rows:
                            self.log(row)
                            console.val_row(row)
                        st.last_val = {row["set"]: row for row in rows}
                        if rows:
                            val_loss = rows[0]["val_loss"]
                            for cb in self.callbacks:
                                cb.on_validation(st, rows[0])
                with _timed(window, "eval_s"):
                    for cb in self.callbacks:
                        cb.on_step_end(st, metrics)
                if st.request_checkpoint:
                    st.request_checkpoint = False
                    with _timed(window, "ckpt_s"):
                        self.save()

            self.save(wait=True)
            for cb in self.callbacks:
                cb.on_end(st)
            if val_loss is None:
                val_loss = _last_val(run)
            if main:
                run.set_marker("DONE", f"step {st.step}, {self.skipped_total} non-finite steps skipped")
            return TrainResult("done", st.step, run.path, val_loss, self.entropy, self.skipped_total)
        finally:
            console.close()
            self.batches.close()

    def _samples(self, batches: list[dict[str, torch.Tensor]]) -> list[int]:
        """[first, last] global sample index of the step."""
        step, gb = self.state.step, self.cfg.train.global_batch
        if self.info.world_size == 1:     # the loader's own record of what it consumed
            return [int(batches[0]["indices"][0]), int(batches[-1]["indices"][-1])]
        return [step * gb - gb, step * gb - 1]


def train(cfg: Config, run_dir: str | Path, resume: bool = False,
          callbacks: Sequence[Callback] | None = None) -> TrainResult:
    """Train (or resume) the run in `run_dir`; under torchrun every rank calls this.

    callbacks: None -> `default_callbacks(cfg)` (train/callbacks); the CLI adds eval's."""
    device = resolve_device(cfg.device)
    had_group = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = init_distributed(cfg.parallel.backend, device.type, cfg.parallel.timeout_s,
                            cpu_collectives=cfg.parallel.cpu_offload)
    owns_group = info.distributed and not had_group     # a caller's process group stays up
    try:
        lock = RunLock(run_dir) if info.is_main else None     # one process per run dir
        held = None
        if lock is not None:
            try:
                lock.acquire()
            except ConfigError as e:
                held = e
        if any_rank(held is not None):                         # every rank fails together
            raise held or ConfigError("--run-dir", f"run dir {run_dir} is in use (rank 0 could not lock it)")
        try:
            cbs = default_callbacks(cfg) if callbacks is None else list(callbacks)
            return Trainer(cfg, run_dir, callbacks=cbs, info=info, resume=resume).fit()
        finally:
            if lock is not None:
                lock.release(keep_dir=RunDir(run_dir).exists())
    finally:
        if owns_group:
            shutdown_distributed()


def _last_val(run: RunDir) -> float | None:
    """The newest val row's loss of the run's first validation set (older runs' rows have no set)."""
    rows = run.read_metrics("val")
    if not rows:
        return None
    last = rows[-1]["step"]
    return next(r for r in rows if r["step"] == last)["val_loss"]     # sets are logged in order


@contextlib.contextmanager
def _timed(window: dict[str, float], key: str) -> Iterator[None]:
    """Add the block's wall time to window[key]."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        window[key] += time.perf_counter() - t0


class MetricLogger:
    """metrics.jsonl rows, mirrored to TensorBoard / W&B when enabled (both off by default).

    The optional packages are checked at construction (before the run dir is touched); their
    writers are opened on the first row."""

    def __init__(self, cfg: Config, run: RunDir):
        self.cfg, self.run = cfg, run
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
