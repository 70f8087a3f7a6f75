"""`ablate launch`, `ablate sweep` and `ablate status`: on a real (private, two-node) Slurm and
through the local shims. Flows are merged so that each proves several things:

- a 2-node job (one torchrun per node, c10d across the nodes, gloo DDP) preempted mid-run with
  `scancel -s USR1 -b`: its trap writes STOP, training checkpoints and writes REQUEUE, the job
  requeues itself and resumes, finishing with the loss of an uninterrupted one-process run;
- a 2-arm x 2-seed sweep as a job array, one task `scontrol requeue`d, all four runs finishing,
  evaluated by a dependent array (`--eval`) and reported done by `ablate status`;
- the same job script run here through the shims (`--local`), stopped by a STOP file and
  rerun by the shim's requeue.
"""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ablate_testing import REPO, make_cfg, train_rows, write_config

from models.registry import ConfigError

pytestmark = pytest.mark.slow


def ablate(*args: str, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def wait(pred, timeout: float, what: str) -> None:
    t0 = time.time()
    while not pred():
        if time.time() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def squeue_empty(env: dict) -> bool:
    out = subprocess.run(["squeue", "-h"], env=env, capture_output=True, text=True)
    return out.returncode == 0 and not out.stdout.strip()


def reached(run: Path, step: int) -> bool:
    try:
        return any(r["step"] >= step for r in train_rows(run))
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return False


def test_two_node_job_preempted_requeued_and_resumed(slurm, launch_dict, tmp_path):
    from train.trainer import train
    data = {**launch_dict, "train": {**launch_dict["train"], "steps": 30}, "checkpoint": {"every": 10}}
    cfg_path = write_config(tmp_path / "two_nodes.yaml", {**data, "parallel": {"backend": "ddp"}})
    reference = train(make_cfg(data), tmp_path / "reference")            # one process, no interruption
    run = tmp_path / "job"
    out = ablate("launch", str(cfg_path), "--slurm", "--nodes", "2", "--nproc-per-node", "1", "--run-dir", str(run),
                 "--signal-lead", "60", env=slurm["env"])
    assert out.returncode == 0, out.stderr
    job = (run / "slurm" / "job_ids").read_text().split()[-1]
    assert f"submitted job {job}" in out.stdout
    wait(lambda: reached(run, 6), 120, "step 6")
    subprocess.run(["scancel", "-s", "USR1", "-b", job], env=slurm["env"], check=True)
    wait(lambda: (run / "DONE").exists() and squeue_empty(slurm["env"]), 180, "the requeued job to finish")

    log = (run / "slurm" / f"{job}.out").read_text()
    assert "(restart 0)" in log and "(restart 1)" in log and "writing" in log and "requeueing job" in log
    assert "node n1 (node rank 0)" in log and "node n2 (node rank 1)" in log       # both nodes took part
    events = [e for e in train_rows(run, "event") if e["event"] == "resume"]
    assert len(events) == 1 and events[0]["world_size"] == 2 and 6 <= events[0]["step"] < 30
    assert events[0]["code_version"]["snapshot"] == str((run / "code").resolve())  # ran the launch snapshot
    assert (run / "checkpoints" / "step-00000030" / "COMPLETE").exists()
    final = train_rows(run)[-1]
    assert final["step"] == 30 and math.isclose(final["loss"], train_rows(tmp_path / "reference")[-1]["loss"],
                                                rel_tol=1e-5)
    assert reference.status == "done"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["code_version"]["git_sha"] == json.loads((run / "code" / "code_version.json").read_text())["git_sha"]


def test_sweep_as_a_job_array_with_a_requeued_task_evaluation_and_status(slurm, launch_dict, tmp_path):
    write_config(tmp_path / "base.yaml", launch_dict)
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(yaml.safe_dump({"name": "demo", "base": "base.yaml", "seeds": [0, 1],
                                     "arms": {"base": {}, "wide": {"model.d_model": 48}},
                                     "runs_dir": str(tmp_path / "sweeps")}))
    out = ablate("sweep", str(sweep), "--slurm", "--nproc-per-node", "1", "--eval", "ablate_val_ppl",
                 env=slurm["env"])
    assert out.returncode == 0, out.stderr
    root = tmp_path / "sweeps" / "demo"
    manifest = json.loads((root / "manifest.json").read_text())
    assert [r["dir"] for r in manifest["runs"]] == ["base__s0", "base__s1", "wide__s0", "wide__s1"]
    job = (root / "base__s1" / "slurm" / "job_ids").read_text().split()[-1]
    assert job.endswith("_1")
    wait(lambda: reached(root / "base__s1", 2), 120, "task 1 to train")
    subprocess.run(["scontrol", "requeue", job], env=slurm["env"], check=True)
    wait(lambda: squeue_empty(slurm["env"]), 240, "the array and its evaluation to finish")

    status = ablate("status", str(root), "--json", env=slurm["env"])
    rows = json.loads(status.stdout)
    assert [r["state"] for r in rows] == ["done"] * 4 and all(r["step"] == 12 for r in rows), status.stdout
    log = (root / "base__s1" / "slurm").glob("*.out")
    assert any("(restart 1)" in p.read_text() for p in log)           # the requeued task ran again
    for r in manifest["runs"]:
        assert list((root / r["dir"] / "eval").glob("step-00000012.*.json")), r["dir"]
    assert ablate("eval", str(root), "--tasks", "ablate_val_ppl", env=slurm["env"]).stdout.count("ablate_val_ppl") >= 4

    # idempotent: nothing left to train; a sweep file that would change a run is refused, naming it
    again = ablate("sweep", str(sweep), "--slurm", "--nproc-per-node", "1", "--dry-run", env=slurm["env"])
    assert "0 runs to train, 4 already done" in again.stdout
    changed = yaml.safe_load(sweep.read_text())
    changed["arms"]["wide"] = {"model.d_model": 64}
    sweep.write_text(yaml.safe_dump(changed))
    refused = ablate("sweep", str(sweep), "--slurm", "--nproc-per-node", "1", "--dry-run", env=slurm["env"])
    assert refused.returncode == 2 and "wide__s0" in refused.stderr and "model.d_model" in refused.stderr


def test_unknown_partition_shows_sbatchs_message_and_leaves_no_run_dir(slurm, launch_dict, tmp_path):
    cfg = write_config(tmp_path / "c.yaml", launch_dict)
    out = ablate("launch", str(cfg), "--slurm", "--nproc-per-node", "1", "--partition", "nowhere",
                 "--run-dir", str(tmp_path / "r"), env=slurm["env"])
    assert out.returncode == 2 and "sbatch refused the job" in out.stderr and "partition" in out.stderr.lower()
    assert not (tmp_path / "r").exists()


def test_local_job_script_stops_requeues_and_resumes_through_the_shims(launch_dict, tmp_path):
    """No Slurm needed: the rendered script runs here; a STOP file mid-run is the trap's effect."""
    from ablate_testing import subprocess_env
    cfg = write_config(tmp_path / "c.yaml", {**launch_dict, "train": {**launch_dict["train"], "steps": 16}})
    run = tmp_path / "local"
    env = subprocess_env(Path(launch_dict["data"]["cache_dir"]))
    proc = subprocess.Popen([sys.executable, "-m", "train.cli", "launch", str(cfg), "--local", "--nproc", "1",
                             "--run-dir", str(run)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    wait(lambda: reached(run, 4), 120, "step 4")
    (run / "STOP").touch()
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    log = next((run / "slurm").glob("local-*.out")).read_text()
    assert "requeueing job" in log and "(restart 1)" in log
    assert (run / "DONE").exists() and train_rows(run)[-1]["step"] == 16
    assert len([e for e in train_rows(run, "event") if e["event"] == "resume"]) == 1


def test_bad_launch_and_sweep_input_names_the_culprit(launch_dict, tmp_path):
    from launch.slurm import SlurmOptions
    from launch.sweep import expand, short_names
    from train.cli import main
    cfg = write_config(tmp_path / "c.yaml", launch_dict)
    assert main(["launch", str(cfg), "--slurm", "--nodes", "0", "--nproc-per-node", "1", "--dry-run",
                 "--run-dir", str(tmp_path / "r0")]) == 2
    with pytest.raises(ConfigError, match="device: cpu") as e:
        SlurmOptions(gpus_per_node=8).check("cpu")
    assert e.value.key == "--gpus-per-node"
    with pytest.raises(ConfigError) as e:
        SlurmOptions().check("cpu")
    assert e.value.key == "--nproc-per-node"
    assert not (tmp_path / "r0").exists()
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "bad", "base": "c.yaml", "arms": {"base": {}, "oops": {"optim.lrr": 1}}}))
    with pytest.raises(ConfigError) as e:
        expand(sweep, tmp_path / "sweeps")
    assert e.value.key == "arms.oops.optim.lrr"
    assert short_names(["optim.lr", "optim.muon.lr", "model.d_model"]) == {
        "optim.lr": "optim.lr", "optim.muon.lr": "muon.lr", "model.d_model": "d_model"}


def test_dry_run_renders_the_job_script(launch_dict, tmp_path):
    from train.cli import main
    cfg = write_config(tmp_path / "c.yaml", {**launch_dict, "launch": {"setup": ["echo setup-line"],
                                                                        "sbatch": ["--mem=1G"]}})
    assert main(["launch", str(cfg), "--slurm", "--nodes", "2", "--nproc-per-node", "3", "--partition", "p",
                 "--time", "1:00:00", "--exclusive", "--run-dir", str(tmp_path / "r"), "--dry-run"]) == 0
    script = (tmp_path / "r" / "slurm" / "job.sbatch").read_text()
    for line in ("#SBATCH --nodes=2", "#SBATCH --partition=p", "#SBATCH --time=1:00:00", "#SBATCH --exclusive",
                 "#SBATCH --mem=1G", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@120", "echo setup-line",
                 "--nnodes=2 --nproc_per_node=3"):
        assert line in script, line
    assert not re.search(r"{{\w+}}", script)                           # every placeholder filled
    assert (tmp_path / "r" / "code" / "train" / "trainer.py").exists()
    assert (tmp_path / "r" / "code" / "code_version.json").exists()


def test_local_sweep_splits_the_cpus_between_parallel_runs(launch_dict, tmp_path, monkeypatch):
    """`--local --parallel K` gives each run OMP_NUM_THREADS = CPUs // K (torchrun sets it only
    for several processes a node), unless the caller set it; one run at a time sets nothing."""
    import launch.slurm as slurm
    write_config(tmp_path / "c.yaml", launch_dict)
    sweep = tmp_path / "s.yaml"
    sweep.write_text(yaml.safe_dump({"name": "thr", "base": "c.yaml", "arms": {"a": {}, "b": {"optim.lr": 1e-3}}}))
    seen: list[dict | None] = []
    monkeypatch.setattr(slurm, "run_local", lambda script, run_dir, extra_env=None: seen.append(extra_env) or 0)
    monkeypatch.setattr(slurm.os, "sched_getaffinity", lambda pid: set(range(5)), raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    out = slurm.launch_sweep(sweep, None, local_parallel=2, runs_root=tmp_path / "sweeps")
    assert out["codes"] == [0, 0] and seen == [{"OMP_NUM_THREADS": "2"}] * 2
    slurm.launch_sweep(sweep, None, local_parallel=8, runs_root=tmp_path / "sweeps")   # 2 runs: 2 slots
    assert seen[2:] == [{"OMP_NUM_THREADS": "2"}] * 2
    assert slurm.local_threads(1) == {} and slurm.local_threads(8) == {"OMP_NUM_THREADS": "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert slurm.local_threads(2) == {}
    monkeypatch.undo()                     # the real run_local: the job script sees extra_env
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)
    script = tmp_path / "job.sh"
    script.write_text(f'echo "$OMP_NUM_THREADS" > {run / "threads"}\n')
    assert slurm.run_local(script, run, extra_env={"OMP_NUM_THREADS": "7"}) == 0
    assert (run / "threads").read_text().strip() == "7"
