"""Reading what `ablate compare` compares: run dirs, sweep manifests, and each run's numbers at
the chosen point (`--at final | step=N | tokens=N`).

A sweep dir holds `manifest.json` = {name, base, seeds, vary_data_seed, arms: {name: overrides},
grid: {key: [values]}, runs: [{dir, arm, grid, seed}]} with `dir` relative to the sweep dir; the
first arm is the baseline. A run dir given alone is linked to its sweep when its parent holds a
manifest naming it. Only files are read: nothing here imports the trainer or torch.
"""
from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from models.registry import ConfigError
from train.config import RECORD_KEYS, flatten
from train.rundir import RunDir

INPUT = "RUN_DIR_OR_SWEEP_DIR"
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------- sweeps
@dataclass
class Sweep:
    path: Path
    name: str
    arms: list[str]                     # manifest order: the first is the baseline
    grid: dict[str, list[Any]]
    vary_data_seed: bool
    runs: list[dict[str, Any]]          # {dir, arm, grid, seed}

    @classmethod
    def load(cls, path: Path) -> "Sweep":
        file = path / MANIFEST
        try:
            m = json.loads(file.read_text())
            runs = [dict(r) for r in m.get("runs", [])]
        except (OSError, json.JSONDecodeError, TypeError, ValueError, AttributeError) as e:
            raise ConfigError(INPUT, f"{file} is not a sweep manifest ({type(e).__name__}: {e})") from None
        if any("dir" not in r or "arm" not in r for r in runs):
            raise ConfigError(INPUT, f"{file}: every entry of `runs` needs `dir` and `arm`")
        return cls(path, str(m.get("name") or path.name), list(m.get("arms") or {}), dict(m.get("grid") or {}),
                   bool(m.get("vary_data_seed", False)), runs)

    def entry(self, run_dir: Path) -> dict[str, Any] | None:
        for r in self.runs:
            if (self.path / r["dir"]).resolve() == run_dir.resolve():
                return r
        return None


# ----------------------------------------------------------------------------- runs
@dataclass
class Run:
    path: Path
    config: dict[str, Any]              # the resolved config, records removed
    derived: dict[str, str]             # {key: source} of the values filled after validation
    rows: list[dict[str, Any]]
    status: str                         # done | requeue | failed | unfinished (no marker)
    status_text: str                    # the marker's content
    sweep: Sweep | None = None
    entry: dict[str, Any] | None = None  # the manifest's entry for this run
    flat: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.flat = flatten(self.config)

    @classmethod
    def load(cls, path: Path, sweep: Sweep | None = None) -> "Run":
        rd = RunDir(path)
        if not rd.exists():
            raise ConfigError(INPUT, f"{path} is not a run directory (no config.yaml)")
        config = rd.read_config()
        derived = config.get("derived") or {}
        for key in RECORD_KEYS:
            config.pop(key, None)
        status, text = "unfinished", ""
        for marker in ("DONE", "FAILED", "REQUEUE"):
            if rd.has(marker):
                status, text = marker.lower(), rd.marker(marker).read_text().strip()
                break
        if sweep is None and (path.parent / MANIFEST).is_file():
            sweep = Sweep.load(path.parent)
        entry = sweep.entry(path) if sweep is not None else None
        return cls(path, config, dict(derived), rd.read_metrics(), status, text, sweep if entry else None, entry)

    # ------------------------------------------------------------------ identity
    @property
    def label(self) -> str:
        return self.path.name

    @property
    def seed(self) -> Any:
        return self.flat.get("seed")

    @property
    def vary_data_seed(self) -> bool:
        return bool(self.sweep and self.sweep.vary_data_seed)

    @property
    def pair_key(self) -> tuple[Any, ...]:
        """What makes two runs of different arms a pair: the seed (and the data seed when the
        sweep varies it with the seed)."""
        return (self.seed, self.flat.get("data.seed")) if self.vary_data_seed else (self.seed,)

    @property
    def tokens_per_step(self) -> int:
        return int(self.flat.get("train.global_batch") or 0) * int(self.flat.get("data.seq_len") or 0)

    @property
    def planned_steps(self) -> int | None:
        return self.flat.get("train.steps")

    def kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("kind") == kind]

    def last_step(self) -> int:
        return max((r["step"] for r in self.rows if r.get("kind") in ("train", "val")), default=0)

    def event(self, name: str) -> dict[str, Any] | None:
        """The last event row of that name (e.g. `model`: each segment logs one)."""
        found = [r for r in self.rows if r.get("kind") == "event" and r.get("event") == name]
        return found[-1] if found else None


def load_inputs(paths: list[str | Path]) -> tuple[list[Run], list[Sweep], list[str]]:
    """The runs named by the command line's positionals (sweep dirs expand to their manifest's
    runs), each once; the sweeps; and messages for manifest runs that have no run dir yet."""
    runs: list[Run] = []
    sweeps: list[Sweep] = []
    missing: list[str] = []
    seen: set[Path] = set()

    def add(run: Run) -> None:
        key = run.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(run)

    for p in map(Path, paths):
        if (p / MANIFEST).is_file():
            sweep = Sweep.load(p)
            sweeps.append(sweep)
            for entry in sweep.runs:
                d = p / entry["dir"]
                if (d / "config.yaml").is_file():
                    add(Run.load(d, sweep))
                else:
                    missing.append(f"sweep {sweep.name}: run {entry['dir']} has no run dir yet (not started)")
        elif (p / "config.yaml").is_file():
            add(Run.load(p))
        else:
            raise ConfigError(INPUT, f"{p} is neither a run dir (config.yaml) nor a sweep dir ({MANIFEST})")
    if not runs:
        raise ConfigError(INPUT, "no run dirs to compare" + (f": {missing[0]}" if missing else ""))
    return runs, sweeps, missing


# ----------------------------------------------------------------------------- the point
@dataclass(frozen=True)
class At:
    """`--at`: final, step=N or tokens=N (the nearest row at or before)."""
    kind: str            # final | step | tokens
    value: int = 0

    @classmethod
    def parse(cls, text: str) -> "At":
        if text == "final":
            return cls("final")
        m = re.fullmatch(r"(step|tokens)=([0-9][0-9_,]*)", text.strip())
        if not m:
            raise ConfigError("--at", f"expected final, step=N or tokens=N, got {text!r}")
        return cls(m.group(1), int(m.group(2).replace("_", "").replace(",", "")))

    def __str__(self) -> str:
        return "final" if self.kind == "final" else f"{self.kind}={self.value:,}"

    def step_limit(self, run: Run) -> int | None:
        """The last step a row may have for this run (None: any)."""
        if self.kind == "final":
            return None
        if self.kind == "step":
            return self.value
        per = run.tokens_per_step
        return self.value // per if per else 0


def _pick(rows: list[dict[str, Any]], limit: int | None) -> dict[str, Any] | None:
    ok = [r for r in rows if limit is None or r["step"] <= limit]
    return max(ok, key=lambda r: r["step"]) if ok else None


@dataclass
class Point:
    """One run's numbers at the chosen point."""
    step: int | None                                    # the step of its heldout val (else train) row
    tokens: int | None
    train: dict[str, Any] | None                        # the train row
    val: dict[str, dict[str, Any]]                      # set -> val row
    eval: dict[tuple[str, str, str], dict[str, Any]]    # (task, metric, hash8) -> eval row
    probes: dict[str, dict[str, Any]]                   # series -> {step, layers: [..], mean, source}
    model: dict[str, Any]                               # params, flops_per_token, tokens_per_s, mfu, mem_gb


def val_sets(run: Run) -> list[str]:
    """The run's validation sets in row order (`heldout` first)."""
    out: list[str] = []
    for r in run.kind("val"):
        if r.get("set", "heldout") not in out:
            out.append(r.get("set", "heldout"))
    return out


def point(run: Run, at: At) -> Point:
    limit = at.step_limit(run)
    train = _pick(run.kind("train"), limit)
    val = {}
    for name in val_sets(run):
        row = _pick([r for r in run.kind("val") if r.get("set", "heldout") == name], limit)
        if row is not None:
            val[name] = row
    evals: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in run.kind("eval"):
        key = (str(r.get("task")), str(r.get("metric")), str(r.get("hash8")))
        if (limit is None or r["step"] <= limit) and (key not in evals or r["step"] >= evals[key]["step"]):
            evals[key] = r
    first = next(iter(val.values()), None)
    ref = first or train
    step = ref["step"] if ref else None
    tokens = ref.get("tokens") if ref else None
    return Point(step, tokens, train, val, evals, probe_values(run, limit), model_columns(run, limit))


def model_columns(run: Run, limit: int | None) -> dict[str, Any]:
    """The `model` event's counts, and throughput from the train rows up to the point: the median
    tokens/s and MFU (the first row, with compilation and warm-up, left out when there are
    others) and the peak memory."""
    ev = run.event("model") or {}
    params = ev.get("params") or {}
    rows = [r for r in run.kind("train") if limit is None or r["step"] <= limit]
    steady = rows[1:] if len(rows) > 1 else rows

    def median(name: str) -> float | None:
        vals = [r[name] for r in steady if isinstance(r.get(name), (int, float))]
        return float(statistics.median(vals)) if vals else None

    mems = [r["mem_gb"] for r in rows if isinstance(r.get("mem_gb"), (int, float))]
    return {"params": params.get("total"), "non_embedding": params.get("non_embedding"),
            "memory_params": params.get("memory_values"), "flops_per_token": ev.get("flops_per_token"),
            "tokens_per_s": median("tokens_per_s"), "mfu": median("mfu"), "mem_gb": max(mems) if mems else None}


# ----------------------------------------------------------------------------- probes
PROBES_DIR = "probes"
PROBES_JSON = "probes.json"


def probe_values(run: Run, limit: int | None) -> dict[str, dict[str, Any]]:
    """Per probe series, the newest values at or before the point, from the in-loop `probe` rows
    of metrics.jsonl and from `ablate probe`'s RUN_DIR/probes/step-*/probes.json (a file wins a
    tie: it usually saw more tokens). Per-head rows are averaged per layer."""
    out: dict[str, dict[str, Any]] = {}
    by_series: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in run.kind("probe"):
        if limit is None or r["step"] <= limit:
            by_series.setdefault(str(r.get("probe")), {}).setdefault(r["step"], []).append(r)
    for name, steps in by_series.items():
        step = max(steps)
        layers: dict[int, list[float]] = {}
        mean = None
        for r in steps[step]:
            if not isinstance(r.get("value"), (int, float)):
                continue
            if r.get("layer") is None:
                mean = float(r["value"]) if r.get("head") is None else mean
            else:
                layers.setdefault(int(r["layer"]), []).append(float(r["value"]))
        n = max(layers) + 1 if layers else 0
        values = [sum(layers[i]) / len(layers[i]) if i in layers else None for i in range(n)]
        out[name] = {"step": step, "layers": values, "mean": mean, "source": "metrics.jsonl"}
    for file in sorted((run.path / PROBES_DIR).glob("step-*/" + PROBES_JSON)):
        try:
            data = json.loads(file.read_text())
            step = int(data["step"])
            series = data["probes"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        if limit is not None and step > limit:
            continue
        for name, s in series.items():
            if name not in out or step >= out[name]["step"]:
                out[name] = {"step": step, "layers": list(s.get("layers") or []), "mean": s.get("mean"),
                             "source": str(file.relative_to(run.path))}
    return out
