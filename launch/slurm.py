"""`ablate launch`: a run dir that can train on its own, a rendered job script, and its submission.

    prepare_run(cfg, run_dir)          RUN_DIR/config.yaml (the resolved config the job trains
                                       from) and RUN_DIR/code/ (a source snapshot + its version)
    render(cfg, opts, run_dirs)        the job script (launch/job.sbatch or launch.template)
    submit(script, ...)                sbatch; the job id goes to RUN_DIR/slurm/job_ids
    run_local(script, run_dir, ...)    the same script, with srun / scontrol shims (launch/shim/)

The job (launch/job.sbatch) runs one srun task per node, each a torchrun agent with c10d
rendezvous on the first node. Its USR1 / TERM trap writes RUN_DIR/STOP (the trainer checkpoints
at the next step boundary and writes REQUEUE); the script then requeues its own job when REQUEUE
exists and DONE does not, and the requeued job resumes from the newest complete checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.registry import ConfigError
from train.rundir import REPO_ROOT, RunDir, atomic_write, code_version

LAUNCH_DIR = Path(__file__).resolve().parent
TEMPLATE = LAUNCH_DIR / "job.sbatch"
SHIM_DIR = LAUNCH_DIR / "shim"
CODE_PACKAGES = ("models", "train", "eval", "launch")      # what RUN_DIR/code/ holds
CODE_VERSION_FILE = "code_version.json"


@dataclass
class SlurmOptions:
    """The Slurm flags of `ablate launch` / `ablate sweep` (None: Slurm's default)."""

    nodes: int = 1
    gpus_per_node: int | None = None
    nproc_per_node: int | None = None
    cpus_per_task: int | None = None
    partition: str | None = None
    time: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_lead: int = 120
    extra: list[str] = field(default_factory=list)           # launch.sbatch lines

    def check(self, device: str) -> None:
        """Bad combinations, named by their flags (exit 2)."""
        if self.nodes < 1:
            raise ConfigError("--nodes", f"must be >= 1, got {self.nodes}")
        if self.signal_lead < 0:
            raise ConfigError("--signal-lead", f"must be >= 0 seconds, got {self.signal_lead}")
        for flag, value in (("--gpus-per-node", self.gpus_per_node), ("--nproc-per-node", self.nproc_per_node),
                            ("--cpus-per-task", self.cpus_per_task)):
            if value is not None and value < 1:
                raise ConfigError(flag, f"must be >= 1, got {value}")
        if device == "cpu":
            if self.gpus_per_node is not None:
                raise ConfigError("--gpus-per-node", "the config trains on device: cpu; give --nproc-per-node "
                                  "(processes per node) instead")
            if self.nproc_per_node is None:
                raise ConfigError("--nproc-per-node", "required for a device: cpu job (there are no GPUs to count)")
        elif self.nproc_per_node is None and self.gpus_per_node is None:
            raise ConfigError("--gpus-per-node", "give the GPUs per node (or --nproc-per-node)")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1


# ----------------------------------------------------------------------------- the run dir
def snapshot_code(dest: Path) -> dict[str, Any]:
    """Copy the source packages into `dest` (RUN_DIR/code/) with their code version beside them,
    so a queued or requeued job runs the code it was launched with."""
    version = code_version()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in CODE_PACKAGES:
        shutil.copytree(REPO_ROOT / package, tmp / package, ignore=ignore)
    (tmp / CODE_VERSION_FILE).write_text(json.dumps(version) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return version


def prepare_run(cfg: Any, run_dir: Path) -> bool:
    """RUN_DIR/config.yaml (the config the job trains from, with its code version) and RUN_DIR/code/.
    An existing run keeps its snapshot and records; its saved config must accept `cfg` (the
    trainer's resume rule: only keys such as train.steps may change) and is rewritten with it.
    Returns whether the run dir was created."""
    from train.config import dump_config
    from train.trainer import prepare_run_dir

    run = RunDir(run_dir)
    if run.exists():
        saved = prepare_run_dir(cfg, run, resume=False)         # raises with the differing keys
        records = {k: saved[k] for k in ("derived", "code_version") if saved and k in saved}
        if not (run.path / "code").is_dir():
            records["code_version"] = snapshot_code(run.path / "code")
        run.write_config(dump_config(cfg, records))
        return False
    run.path.mkdir(parents=True, exist_ok=True)
    version = snapshot_code(run.path / "code")
    run.write_config(dump_config(cfg, {"code_version": version}))
    return True


# ----------------------------------------------------------------------------- the job script
def _sbatch_lines(cfg: Any, opts: SlurmOptions, name: str, log: str, array: str | None) -> list[str]:
    lines = [f"--job-name={name}", f"--nodes={opts.nodes}", "--ntasks-per-node=1",
             f"--signal=B:USR1@{opts.signal_lead}", "--requeue", "--open-mode=append",
             f"--output={log}", f"--error={log}"]
    if opts.cpus_per_task is not None:
        lines.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.gpus_per_node is not None:
        lines.append(f"--gpus-per-node={opts.gpus_per_node}")
    for flag, value in (("partition", opts.partition), ("time", opts.time), ("account", opts.account),
                        ("qos", opts.qos), ("constraint", opts.constraint)):
        if value is not None:
            lines.append(f"--{flag}={value}")
    if opts.exclusive:
        lines.append("--exclusive")
    if array is not None:
        lines.append(f"--array={array}")
    lines += [*cfg.launch.sbatch, *opts.extra]
    return [f"#SBATCH {line}" for line in lines]


def render(cfg: Any, opts: SlurmOptions, run_dirs: list[Path], name: str, log: str,
           array: str | None = None) -> str:
    """The job script for one run dir, or (several) a job array whose task i trains run_dirs[i]."""
    template = Path(cfg.launch.template) if cfg.launch.template else TEMPLATE
    if not template.is_file():
        raise ConfigError("launch.template", f"job script template not found: {template}")
    if len(run_dirs) == 1 and array is None:
        select = f"RUN_DIR={shlex.quote(str(run_dirs[0].resolve()))}"
    else:
        listed = " ".join(shlex.quote(str(d.resolve())) for d in run_dirs)
        select = f"RUNS=({listed})\nRUN_DIR=${{RUNS[$SLURM_ARRAY_TASK_ID]}}"
    values = {"sbatch_lines": "\n".join(_sbatch_lines(cfg, opts, name, log, array)), "select_run_dir": select,
              "setup_lines": "\n".join(cfg.launch.setup) or ":", "python": shlex.quote(cfg.launch.python or sys.executable),
              "nodes": str(opts.nodes), "nproc_per_node": str(opts.procs_per_node)}
    text = template.read_text()
    unknown = sorted(set(re.findall(r"{{(\w+)}}", text)) - set(values))
    if unknown:
        raise ConfigError("launch.template", f"{template}: unknown placeholders {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(values))}")
    return re.sub(r"{{(\w+)}}", lambda m: values[m.group(1)], text)


def write_script(run: RunDir, text: str, stem: str = "job") -> Path:
    path = run.path / "slurm" / f"{stem}.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)
    path.chmod(0o755)
    return path


def run_script(cfg: Any, opts: SlurmOptions, run: RunDir) -> Path:
    """RUN_DIR/slurm/job.sbatch: the job script of one run, its log RUN_DIR/slurm/<job id>.out."""
    log = str((run.path / "slurm" / "%j.out").resolve())
    return write_script(run, render(cfg, opts, [run.path], f"ablate-{cfg.name}", log))


# ----------------------------------------------------------------------------- submission
def sbatch(script: Path, *extra: str) -> str:
    """Submit; returns the job id. sbatch's own message on failure (ConfigError: exit 2)."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--slurm", "sbatch is not on PATH (no Slurm here; try --local)")
    out = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True)
    if out.returncode != 0:
        raise ConfigError("--slurm", f"sbatch refused the job: {(out.stderr or out.stdout).strip()}")
    return out.stdout.strip().split(";")[0]


def record_job(run: RunDir, job_id: str) -> None:
    path = run.path / "slurm" / "job_ids"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(job_id + "\n")


def job_ids(run: RunDir) -> list[str]:
    path = run.path / "slurm" / "job_ids"
    return path.read_text().split() if path.exists() else []


def launch_slurm(cfg: Any, run_dir: Path, opts: SlurmOptions, dry_run: bool = False) -> tuple[Path, str | None]:
    """`ablate launch --slurm`: prepare, render, submit. A refused submission removes the run dir
    it created (nothing half-made is left). Returns (script, job id or None for --dry-run)."""
    opts.check(cfg.device)
    created = not RunDir(run_dir).exists()
    try:
        prepare_run(cfg, run_dir)
        run = RunDir(run_dir)
        script = run_script(cfg, opts, run)
        if dry_run:
            return script, None
        job = sbatch(script)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    record_job(run, job)
    return script, job


# ----------------------------------------------------------------------------- local runs
def local_env(run_dir: Path, job_id: str, task: int | None = None) -> dict[str, str]:
    """The environment a Slurm job would see, for the shims (one node: this host)."""
    env = {**os.environ, "PATH": f"{SHIM_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
           "SLURM_JOB_ID": job_id, "SLURM_JOB_NODELIST": "localhost", "SLURM_NNODES": "1",
           "SLURM_JOB_NUM_NODES": "1", "SLURMD_NODENAME": "localhost", "SLURM_NODEID": "0",
           "ABLATE_SHIM_DIR": str(Path(run_dir) / "slurm")}
    if task is not None:
        env["SLURM_ARRAY_TASK_ID"] = str(task)
    return env


def run_local(script: Path, run_dir: Path, task: int | None = None, max_requeues: int = 100,
              extra_env: dict[str, str] | None = None) -> int:
    """Run a rendered job script on this host through the shims (launch/shim/srun, scontrol): the
    trap and requeue logic is the one Slurm runs. A requeue (the shim records it) reruns the
    script; returns the last exit status. `extra_env` is added to the job's environment."""
    run = RunDir(run_dir)
    job_id = f"local-{int(time.time())}"
    record_job(run, job_id)
    log = run.path / "slurm" / f"{job_id}.out"
    flag = run.path / "slurm" / "requeue_requested"
    rc = 0
    for restart in range(max_requeues + 1):
        flag.unlink(missing_ok=True)
        env = {**local_env(run.path, job_id, task), **(extra_env or {}), "SLURM_RESTART_COUNT": str(restart)}
        with open(log, "a") as out:
            rc = subprocess.run(["bash", str(script)], env=env, stdout=out, stderr=subprocess.STDOUT).returncode
        if not flag.exists():
            return rc
    return rc


# ----------------------------------------------------------------------------- sweeps
def eval_script(cfg: Any, run_dirs: list[Path], tasks: str, log: str, array: str, dependency: str | None) -> str:
    """A job array that evaluates each run's final checkpoint (`ablate eval`) from its snapshot."""
    python = shlex.quote(cfg.launch.python or sys.executable)
    listed = " ".join(shlex.quote(str(d.resolve())) for d in run_dirs)
    lines = [f"--job-name=ablate-eval-{cfg.name}", "--nodes=1", "--ntasks=1", f"--array={array}",
             f"--output={log}", f"--error={log}", *cfg.launch.sbatch]
    if dependency:
        lines.append(f"--dependency=afterok:{dependency}")
    header = "\n".join(f"#SBATCH {line}" for line in lines)
    setup = "\n".join(cfg.launch.setup) or ":"
    return f"""#!/bin/bash
# ablate: evaluate each sweep run's final checkpoint (rendered by launch/slurm.py)
{header}
set -uo pipefail
RUNS=({listed})
RUN_DIR=${{RUNS[$SLURM_ARRAY_TASK_ID]}}
{setup}
export PYTHONPATH="$RUN_DIR/code${{PYTHONPATH:+:$PYTHONPATH}}"
exec {python} -m train.cli eval "$RUN_DIR" --tasks {shlex.quote(tasks)}
"""


def local_threads(parallel: int) -> dict[str, str]:
    """OMP_NUM_THREADS for `parallel` runs sharing this host: the CPUs this process may use split
    evenly (a cgroup CPU quota is not seen). torchrun sets it only for several processes per node,
    so without this each run of a `--local --parallel K` sweep takes every core and K of them
    oversubscribe the machine (two 2-thread trainings on 2 cores ran at an eighth of their speed,
    5k against 40k tokens/s). Nothing is set for one run, or when the caller set it."""
    if parallel <= 1 or "OMP_NUM_THREADS" in os.environ:
        return {}
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return {"OMP_NUM_THREADS": str(max(1, cpus // parallel))}


def launch_sweep(path: str | Path, opts: SlurmOptions | None, *, local_parallel: int | None = None,
                 eval_tasks: str | None = None, max_concurrent: int | None = None, dry_run: bool = False,
                 runs_root: str | Path | None = None) -> dict[str, Any]:
    """`ablate sweep`: materialise, then one job array (Slurm) or the runs on this host (K at a
    time). Returns {root, todo, done, job, eval_job}."""
    from launch.sweep import expand, materialise

    root, manifest, runs = expand(path, runs_root)
    cfg0 = runs[0].cfg
    if opts is not None:
        opts.check(cfg0.device)
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError("--max-concurrent", f"must be >= 1, got {max_concurrent}")
    if local_parallel is not None and local_parallel < 1:
        raise ConfigError("--parallel", f"must be >= 1, got {local_parallel}")
    todo, done = materialise(root, manifest, runs)
    out: dict[str, Any] = {"root": root, "todo": [r.dir for r in todo], "done": [r.dir for r in done],
                           "job": None, "eval_job": None}
    if not todo and not eval_tasks:
        return out
    slurm_dir = root / "slurm"
    slurm_dir.mkdir(parents=True, exist_ok=True)
    if opts is not None:                                   # one job array over the runs still to train
        job = None
        if todo:
            n = len(todo)
            array = f"0-{n - 1}" + (f"%{max_concurrent}" if max_concurrent else "")
            text = render(cfg0, opts, [r.dir for r in todo], f"ablate-{root.name}",
                          str((slurm_dir / "%A_%a.out").resolve()), array=array)
            script = slurm_dir / "sweep.sbatch"
            atomic_write(script, text)
            out["script"] = script
            if not dry_run:
                job = sbatch(script)
                for i, r in enumerate(todo):
                    record_job(RunDir(r.dir), f"{job}_{i}")
        out["job"] = job
        if eval_tasks:
            every = [r.dir for r in runs]
            text = eval_script(cfg0, every, eval_tasks, str((slurm_dir / "eval_%A_%a.out").resolve()),
                               f"0-{len(every) - 1}", job)
            script = slurm_dir / "eval.sbatch"
            atomic_write(script, text)
            if not dry_run:
                out["eval_job"] = sbatch(script)
        return out
    # on this host: each run's own job script through the shims
    from concurrent.futures import ThreadPoolExecutor
    if dry_run:
        return out
    nproc = 1
    threads = local_threads(min(local_parallel or 1, len(todo)))      # fewer runs than slots: more each

    def one(r: Any) -> int:
        run = RunDir(r.dir)
        return run_local(run_script(r.cfg, SlurmOptions(nodes=1, nproc_per_node=nproc), run), run.path,
                         extra_env=threads)

    with ThreadPoolExecutor(max_workers=local_parallel or 1) as pool:
        codes = list(pool.map(one, todo))
    out["codes"] = codes
    if eval_tasks:
        for d in [r.dir for r in runs]:
            env = {**os.environ, "PYTHONPATH": f"{Path(d) / 'code'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
            subprocess.run([sys.executable, "-m", "train.cli", "eval", str(d), "--tasks", eval_tasks], env=env,
                           check=False)
    return out
