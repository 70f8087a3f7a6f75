"""`ablate sweep`: arms x grid x seeds expanded into run dirs and a manifest, then trained.

    name: ffn_study
    base: ../ablations/ffn/swiglu.yaml      # the baseline arm's config, relative to this file
    seeds: [0, 1, 2]                        # sets `seed` (and data.seed with vary_data_seed: true)
    arms: {swiglu: {}, polynorm: {model.ffn.kind: mlp, model.ffn.activation: polynorm}}
    grid: {optim.lr: [1.0e-3, 2.0e-3]}      # optional cartesian axes applied to every arm

-> runs/sweeps/<name>/manifest.json {name, base, seeds, vary_data_seed, arms, grid, runs: [{dir,
arm, grid, seed}]} and one run dir per point, `<arm>[__<key>=<value>...]__s<seed>` with keys
shortened to their last path part (the shortest unambiguous suffix when two collide).
Expansion is idempotent: finished runs (DONE) are skipped, unfinished ones resume, and a sweep
file that would change an existing run's config is refused, naming the run.
"""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from models.registry import ConfigError
from train.rundir import RunDir, atomic_write

SWEEP_KEYS = ("name", "base", "seeds", "vary_data_seed", "arms", "grid", "runs_dir")


@dataclass
class SweepRun:
    dir: Path
    arm: str
    grid: dict[str, Any]
    seed: int
    cfg: Any                      # the validated Config


def short_names(keys: list[str]) -> dict[str, str]:
    """Each dotted key's shortest suffix of path parts that no other key shares (last part first)."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(o != key and (o == suffix or o.endswith("." + suffix)) for o in keys):
                break
        out[key] = suffix
    return out


def _value_name(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip().replace("/", "_") \
        .replace(" ", "")


def read_sweep(path: str | Path) -> dict[str, Any]:
    from train.config import read_yaml
    path = Path(path)
    raw = read_yaml(path)
    unknown = sorted(set(raw) - set(SWEEP_KEYS))
    if unknown:
        raise ConfigError(unknown[0], f"{path}: unknown sweep key; known: {', '.join(SWEEP_KEYS)}")
    for key in ("name", "base", "arms"):
        if key not in raw:
            raise ConfigError(key, f"{path}: required sweep key is missing")
    if not isinstance(raw["arms"], dict) or not raw["arms"]:
        raise ConfigError("arms", f"{path}: a mapping of arm name -> overrides, the baseline first")
    raw.setdefault("seeds", [0])
    raw.setdefault("vary_data_seed", False)
    raw.setdefault("grid", {})
    if not isinstance(raw["grid"], dict) or any(not isinstance(v, list) or not v for v in raw["grid"].values()):
        raise ConfigError("grid", f"{path}: a mapping of key -> non-empty list of values")
    raw["base_path"] = (path.parent / raw["base"]).resolve()
    return raw


def _config(base: Path, overrides: dict[str, Any], where: str) -> Any:
    """The base config with dict overrides, through the same validation as command-line ones."""
    from train.config import config_from_dict, load_raw, set_dotted
    data = load_raw(base)
    for key, value in overrides.items():
        try:
            set_dotted(data, str(key).split("."), value)
        except ConfigError as e:
            raise ConfigError(f"{where}.{key}", e.message) from None
    try:
        cfg = config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}.{e.key}" if e.key else where, e.message) from None
    return cfg


def expand(path: str | Path, runs_root: str | Path | None = None) -> tuple[Path, dict[str, Any], list[SweepRun]]:
    """The sweep dir, its manifest and every run with its validated config (nothing written)."""
    sweep = read_sweep(path)
    name = str(sweep["name"])
    root = Path(runs_root or sweep.get("runs_dir") or Path("runs") / "sweeps") / name
    grid_keys = list(sweep["grid"])
    short = short_names(grid_keys)
    runs: list[SweepRun] = []
    for arm, arm_overrides in sweep["arms"].items():
        if arm_overrides is None:
            arm_overrides = {}
        if not isinstance(arm_overrides, dict):
            raise ConfigError(f"arms.{arm}", f"expected a mapping of overrides, got {arm_overrides!r}")
        for values in itertools.product(*(sweep["grid"][k] for k in grid_keys)):
            point = dict(zip(grid_keys, values))
            for seed in sweep["seeds"]:
                overrides = {**arm_overrides, **point, "seed": seed, "name": f"{name}/{arm}"}
                if sweep["vary_data_seed"]:
                    overrides["data.seed"] = seed
                cfg = _config(sweep["base_path"], overrides, f"arms.{arm}")
                parts = [arm, *(f"{short[k]}={_value_name(v)}" for k, v in point.items()), f"s{seed}"]
                runs.append(SweepRun(root / "__".join(parts), arm, point, seed, cfg))
    manifest = {"name": name, "base": str(sweep["base_path"]), "seeds": sweep["seeds"],
                "vary_data_seed": sweep["vary_data_seed"], "arms": sweep["arms"], "grid": sweep["grid"],
                "runs": [{"dir": r.dir.name, "arm": r.arm, "grid": r.grid, "seed": r.seed} for r in runs]}
    return root, manifest, runs


def materialise(root: Path, manifest: dict[str, Any], runs: list[SweepRun]) -> tuple[list[SweepRun], list[SweepRun]]:
    """Write the manifest and every run dir (config + code snapshot) of an `expand`ed sweep.
    Returns (runs to train, runs already done). Checks every existing run first, so a refused
    sweep writes nothing."""
    from launch.slurm import prepare_run
    from train.trainer import prepare_run_dir

    for r in runs:                           # refuse before writing anything
        run = RunDir(r.dir)
        if run.exists():
            try:
                prepare_run_dir(r.cfg, run, resume=False)
            except ConfigError as e:
                raise ConfigError(str(r.dir), f"the sweep file would change this existing run's config: "
                                  f"{e.message}") from None
    root.mkdir(parents=True, exist_ok=True)
    atomic_write(root / "manifest.json", json.dumps(manifest, indent=1) + "\n")
    todo, done = [], []
    for r in runs:
        if RunDir(r.dir).has("DONE"):
            done.append(r)                   # a finished run dir is never touched again
            continue
        prepare_run(r.cfg, r.dir)
        todo.append(r)
    return todo, done


def sweep_run_dirs(path: str | Path) -> list[Path]:
    """The run dirs of a sweep dir (from its manifest)."""
    root = Path(path)
    manifest = json.loads((root / "manifest.json").read_text())
    return [root / r["dir"] for r in manifest["runs"]]


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "manifest.json").is_file()
