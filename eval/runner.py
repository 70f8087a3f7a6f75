"""Run lm-eval tasks on a model of a run: task lookup, reuse by settings hash, result files.

    spec = EvalSpec(tasks=["ablate_val_ppl"], limit=50)
    results = evaluate_run("runs/quickstart", "latest", spec)           # from checkpoints
    result = evaluate_model(model, tokenizer, RunDir(d), step, spec)    # a live model (the hook)

Task lookup: our eval/tasks/ plus --include-path folders first, without lm-eval's built-in
index (fast, offline); the built-in index is only built when a name is not found there.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from eval import local
from eval.results import load_result, log_missing_rows, metrics_from_lm_eval, result_path, save_result, settings_hash
from models.registry import ConfigError
from train.rundir import RunDir
from train.runtime import rank0_decides


@dataclass
class EvalSpec:
    """What to evaluate. Only tasks, limit, num_fewshot (+ versions, data) enter the hash."""

    tasks: list[str]
    limit: int | float | None = None
    num_fewshot: int | None = None
    batch_size: int = 16
    include_path: list[str] = field(default_factory=list)
    data_dir: str | None = None
    bootstrap_iters: int = 100_000

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = [t for t in self.tasks.split(",")]
        self.tasks = list(dict.fromkeys(t.strip() for t in self.tasks if t and t.strip()))   # ordered, unique
        if isinstance(self.include_path, (str, Path)):
            self.include_path = [str(self.include_path)]
        self.include_path = [str(p) for p in (self.include_path or [])]
        if not self.tasks:
            raise ConfigError("--tasks", "no task given (comma-separated lm-eval task names, e.g. ablate_val_ppl)")
        if self.limit is not None and self.limit <= 0:
            raise ConfigError("--limit", f"must be > 0, got {self.limit}")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("--num-fewshot", f"must be >= 0, got {self.num_fewshot}")
        if self.batch_size < 1:
            raise ConfigError("--batch-size", f"must be >= 1, got {self.batch_size}")


@dataclass
class TaskPlan:
    """Loaded lm-eval task objects plus the settings (and hash) their results are filed under."""

    manager: Any
    objects: list[Any]
    settings: dict[str, Any]
    hash8: str


@contextlib.contextmanager
def quiet_lm_eval(level: int = logging.ERROR):
    """lm-eval logs a warning per custom dataset and metric default and draws a progress bar per
    task: keep the trainer's and the CLI's output readable."""
    import lm_eval.api.task as task_module

    logger = logging.getLogger("lm_eval")
    old_level, old_tqdm = logger.level, task_module.tqdm
    logger.setLevel(level)
    task_module.tqdm = functools.partial(old_tqdm, disable=True)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        task_module.tqdm = old_tqdm


def task_manager(spec: EvalSpec, metadata: dict[str, Any]) -> Any:
    """A TaskManager that knows every requested name; ConfigError naming unknown ones."""
    from lm_eval.tasks import TaskManager

    for p in spec.include_path:
        if not Path(p).expanduser().is_dir():
            raise ConfigError("--include-path", f"{p} is not a folder of task YAMLs")
    paths = [str(local.TASK_DIR)] + [str(Path(p).expanduser().resolve()) for p in spec.include_path]
    tm = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(t in tm.all_tasks for t in spec.tasks):
        return tm
    tm = TaskManager(include_path=paths, include_defaults=True, metadata=metadata)
    unknown = [t for t in spec.tasks if t not in tm.all_tasks]
    if unknown:
        raise ConfigError("--tasks", f"unknown task(s): {', '.join(unknown)}. Local tasks: "
                                     f"{', '.join(local.LOCAL_TASKS)}; otherwise an lm-eval task, group or tag "
                                     "name, or a task in an --include-path folder")
    return tm


def plan_tasks(spec: EvalSpec, run: RunDir, tokenizer: Any, val_data: Any = None) -> TaskPlan:
    """Check inputs, load the tasks (their datasets) and compute the settings hash."""
    metadata: dict[str, Any] = {}
    if local.VAL_PPL in spec.tasks:
        metadata["val_docs"] = str(local.write_val_docs(run, tokenizer, val_data).resolve())
    for t in spec.tasks:
        if t in local.DATA_DIR_TASKS:
            local.data_files(t, spec.data_dir, run)       # ConfigError naming --data-dir
    if spec.data_dir:
        metadata["data_dir"] = str(Path(spec.data_dir).expanduser().resolve())
    with quiet_lm_eval():
        tm = task_manager(spec, metadata)
        objects: list[Any] = []
        versions: dict[str, Any] = {}
        for name in spec.tasks:
            try:
                loaded = tm.load(name)
            except Exception as e:  # noqa: BLE001 - dataset download/parse errors: name the task
                hint = (" (offline: the local tasks ablate_hellaswag, ablate_arc_easy and ablate_val_ppl "
                        "need no network)") if "offline" in str(e).lower() else ""
                raise ConfigError("--tasks", f"cannot load task {name}: {type(e).__name__}: {e}{hint}") from None
            objects.extend([loaded["groups"][name]] if name in loaded["groups"] else loaded["tasks"].values())
            versions.update({n: t.VERSION for n, t in loaded["tasks"].items()})
            versions.update({n: g.version for n, g in loaded["groups"].items()})
    settings = {"tasks": sorted(set(spec.tasks)), "limit": spec.limit, "num_fewshot": spec.num_fewshot,
                "versions": versions, "data": local.data_fingerprint(spec.tasks, spec.data_dir, run)}
    return TaskPlan(tm, objects, settings, settings_hash(settings))


def _dist_rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def evaluate_model(model: nn.Module, tokenizer: Any, run: RunDir, step: int, spec: EvalSpec, *,
                   val_data: Any = None, log: Callable[[dict[str, Any]], None] | None = None,
                   source: str = "cli") -> dict[str, Any] | None:
    """Evaluate a live model; returns the result (rank 0), reusing a file with the same settings.

    Under a process group every rank must call this with the same arguments: all ranks run the
    same forwards (see eval/adapter.py); rank 0 writes the file and the metrics rows.
    """
    import lm_eval

    from eval.adapter import AblateLM

    plan = plan_tasks(spec, run, tokenizer, val_data)
    path = result_path(run, step, plan.hash8)
    writer = _dist_rank() == 0
    existing = load_result(path) if writer else None
    if rank0_decides(existing is not None):   # all ranks take rank 0's branch (no FSDP2 deadlock)
        if writer and existing is not None:
            log_missing_rows(run, existing, log)
            return {**existing, "path": str(path), "reused": True}
        return None

    lm = AblateLM(model, tokenizer, batch_size=spec.batch_size)
    was_training = lm.model.training
    lm.model.eval()
    t0 = time.perf_counter()
    try:
        with quiet_lm_eval(), torch.no_grad():
            out = lm_eval.simple_evaluate(model=lm, tasks=plan.objects, task_manager=plan.manager,
                                          num_fewshot=spec.num_fewshot, limit=spec.limit, log_samples=False,
                                          bootstrap_iters=spec.bootstrap_iters)
    finally:
        lm.model.train(was_training)
    if not writer or out is None:
        return None
    result = {
        "step": step, "hash8": plan.hash8, "settings": plan.settings,
        "metrics": metrics_from_lm_eval(out), "versions": dict(out.get("versions", {})),
        "n_shot": dict(out.get("n-shot", {})), "n_samples": dict(out.get("n-samples", {})),
        "config": {"source": source, "batch_size": spec.batch_size, "max_length": lm.max_length,
                   "device": str(lm.device), "include_path": spec.include_path, "data_dir": spec.data_dir,
                   "bootstrap_iters": spec.bootstrap_iters, "lm_eval": _lm_eval_version()},
        "time_s": round(time.perf_counter() - t0, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_result(path, result)
    log_missing_rows(run, result, log)
    return {**result, "path": str(path), "reused": False}


def _lm_eval_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return None


def checkpoint_steps(run: RunDir, step: int | str | None) -> list[int]:
    """--step latest | all | N -> the complete checkpoint steps to evaluate."""
    from train import checkpoint as ckpt

    have = [s for s, _ in ckpt.complete_checkpoints(run.checkpoints)]
    if not have:
        raise ConfigError("--step", f"no complete checkpoint under {run.checkpoints}")
    if step in (None, "latest"):
        return [have[-1]]
    if step == "all":
        return have
    try:
        n = int(step)
    except (TypeError, ValueError):
        raise ConfigError("--step", f"expected latest, all or a step number, got {step!r}") from None
    if n not in have:
        raise ConfigError("--step", f"no complete checkpoint for step {n} (have: {', '.join(map(str, have))})")
    return [n]


def evaluate_run(run_dir: str | Path, step: int | str | None, spec: EvalSpec,
                 device: str | None = None) -> list[dict[str, Any]]:
    """`ablate eval`: evaluate the chosen checkpoints of a run, one result per step."""
    from train import checkpoint as ckpt
    from train.callbacks.activation_schedule import apply_checkpoint_activation
    from train.data import load_tokenizer
    from train.rundir import step_name
    from train.runtime import load_run_config, resolve_device

    run = RunDir(run_dir)
    cfg = load_run_config(run_dir)
    from train.data.source import no_tokenizer_reason
    reason = no_tokenizer_reason(cfg)
    if reason is not None:
        print(f"ablate: eval skipped: {reason}", file=sys.stderr)
        return []
    if not run.tokenizer_dir.is_dir():
        raise ConfigError("RUN_DIR", f"{run.tokenizer_dir} is missing: evaluation needs the run's tokenizer")
    tokenizer = load_tokenizer(run.tokenizer_dir)
    steps = checkpoint_steps(run, step)
    import models
    from train.runlock import RunLock
    model = models.Decoder(cfg.model).to(resolve_device(device or cfg.device))
    out = []
    with RunLock(run.path):            # its writes (results, metrics rows) never race a training's
        for s in steps:
            ckpt.load_model_weights(run.checkpoints / step_name(s), model)
            apply_checkpoint_activation(model, s, cfg)     # a ReLU fine-tune checkpoint is evaluated with ReLU
            out.append(evaluate_model(model, tokenizer, run, s, spec))
    return out
