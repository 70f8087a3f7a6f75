"""Grouping runs into arms: runs with the same resolved config, up to the keys that do not make
a different experiment.

Ignored (`ignored_key`): `seed`; every key whose `derived:` source is `seed` (e.g.
`model.ffn.stochastic.seed` left null); `data.seed` when the run's sweep manifest says
`vary_data_seed: true`; `name`; and the operational keys that may change on resume without
changing the numbers: `checkpoint.*`, `eval.*`, `log.*`, `parallel.*`, `launch.*`,
`data.cache_dir`, `data.num_proc` and the logging cadence `train.log_every`, `train.val_every`.
Everything else separates arms, `train.steps` included (a longer run is another budget), and so
do `train.val_batches` (another validation measurement) and the LR schedule's keys.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from eval.compare.runs import Run

IGNORED_KEYS = ("seed", "name", "data.cache_dir", "data.num_proc", "train.log_every", "train.val_every")
IGNORED_PREFIXES = ("checkpoint.", "eval.", "log.", "parallel.", "launch.")
MAX_NAME_KEYS = 3       # arms differing in more keys are named by their first run's `name`


def ignored_key(key: str, run: Run) -> bool:
    """Whether `key` may differ between runs of one arm (the module docstring lists them)."""
    return (key in IGNORED_KEYS or key.startswith(IGNORED_PREFIXES) or run.derived.get(key) == "seed"
            or (key == "data.seed" and run.vary_data_seed))


def arm_config(run: Run) -> dict[str, Any]:
    """The flat config that defines the run's arm."""
    return {k: v for k, v in run.flat.items() if not ignored_key(k, run)}


def _signature(run: Run) -> str:
    return json.dumps(arm_config(run), sort_keys=True, default=str)


@dataclass
class Arm:
    name: str
    runs: list[Run]
    arm: str                                         # the manifest's arm name (else the name)
    cell: dict[str, Any] = field(default_factory=dict)   # the manifest's grid values (sweeps)
    config: dict[str, Any] = field(default_factory=dict)  # the defining flat config
    differs: dict[str, Any] = field(default_factory=dict)  # its values of the keys arms differ in, those it has

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


def short_key(key: str, keys: list[str]) -> str:
    """The shortest dotted tail of `key` that no other key in `keys` ends with."""
    parts = key.split(".")
    for n in range(1, len(parts) + 1):
        tail = ".".join(parts[-n:])
        if not any(k != key and (k == tail or k.endswith("." + tail)) for k in keys):
            return tail
    return key


def _value(v: Any) -> str:
    return "(absent)" if v is _ABSENT else (json.dumps(v) if isinstance(v, (dict, list)) else str(v))


_ABSENT = object()


def _manifest_name(run: Run) -> tuple[str, dict[str, Any]] | None:
    """(name, grid cell) from the run's manifest entry: its dir name without the `__s<seed>`
    suffix (`<arm>[__<key>=<value>...]`, as `ablate sweep` names run dirs)."""
    e = run.entry
    if e is None:
        return None
    cell = dict(e.get("grid") or {})
    d, suffix = Path(str(e["dir"])).name, f"__s{e.get('seed')}"
    name = d[: -len(suffix)] if d.endswith(suffix) and len(d) > len(suffix) else \
        str(e["arm"]) + "".join(f"__{k}={v}" for k, v in cell.items())
    return name, cell


def group(runs: list[Run]) -> list[Arm]:
    """Arms in the order their first run appears (a sweep's runs in manifest order). Names come
    from the sweep manifest (`<arm>[__<key>=<value>...]`, the run dirs' names without the seed)
    when every run of the arm has the same one, otherwise from the keys the arms differ in
    (`lr=0.001,n_layers=4`; more than MAX_NAME_KEYS of them: the config's `name`)."""
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(_signature(r), []).append(r)
    configs = [arm_config(rs[0]) for rs in groups.values()]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({json.dumps(c.get(k, "\0absent"), sort_keys=True, default=str)
                                         for c in configs}) > 1]
    arms: list[Arm] = []
    for rs, cfg in zip(groups.values(), configs):
        differs = {k: cfg.get(k, _ABSENT) for k in differing}
        entries = [_manifest_name(r) for r in rs]
        same = all(e is not None and e[0] == entries[0][0] for e in entries)
        named = entries[0] if same else None
        if named is not None:
            name, cell, arm = named[0], named[1], str(rs[0].entry["arm"])
        else:                                        # a short name, else the run's own
            name = ",".join(f"{short_key(k, differing)}={_value(v)}" for k, v in differs.items())
            if not name or len(differing) > MAX_NAME_KEYS:
                name = str(rs[0].flat.get("name") or rs[0].label)
            cell, arm = {}, name
        # keys the arm lacks (another arm's mixer letter, say) are left out: what it has says what it is
        arms.append(Arm(name, rs, arm, cell, cfg, {k: v for k, v in differs.items() if v is not _ABSENT}))
    used: dict[str, int] = {}
    for a in arms:                                   # names are keys: keep them unique
        used[a.name] = used.get(a.name, 0) + 1
        if used[a.name] > 1:
            a.name = f"{a.name}#{used[a.name]}"
    return arms
