"""`ablate compare`: runs -> arms -> a report of which arm wins, by how much and how sure we are.

- runs.py: run dirs, sweep manifests, each run's numbers at `--at`
- arms.py: grouping runs into arms (which config keys are ignored) and naming them
- metric.py: `--metric`
- stats.py: means, standard errors, t intervals, paired and Welch tests (numpy, scipy)
- report.py: every number and warning of the report (what `--format json` writes)
- plots.py, document.py: figures (matplotlib) and report.md / report.html

numpy, scipy and matplotlib come with the `plots` extra (pip install 'ablate[plots]').
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from models.registry import ConfigError

FORMATS = ("md", "json")


def require(fmt: str) -> None:
    """A ConfigError naming --format when a package the format needs is missing (exit 2)."""
    if fmt not in FORMATS:
        raise ConfigError("--format", f"expected one of {', '.join(FORMATS)}, got {fmt!r}")
    needed = ["numpy", "scipy"] + (["matplotlib"] if fmt == "md" else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        hint = " (or --format json, which needs no matplotlib)" if missing == ["matplotlib"] else ""
        raise ConfigError("--format", f"ablate compare --format {fmt} needs {', '.join(missing)}: "
                                      f"pip install 'ablate[plots]'{hint}")


def default_out(paths: list[str | Path]) -> Path:
    """RUN_DIR/report or SWEEP_DIR/report for one input; several need --out."""
    if len(paths) != 1:
        raise ConfigError("--out", "several run or sweep dirs: name the report's folder with --out DIR")
    return Path(paths[0]) / "report"


def write(c: Any, out: Path, fmt: str = "md", log_x: bool = False) -> list[Path]:
    """Write the report of Comparison `c` into `out`: report.md, report.html and the PNGs (md),
    or report.json (json). Returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path = out / "report.json"
        path.write_text(json.dumps(c.data, indent=2, default=str, allow_nan=False) + "\n")
        return [path]
    from eval.compare.document import build_doc, to_html, to_markdown
    from eval.compare.plots import figures
    images = figures(c, log_x)
    doc = build_doc(c, images)
    written = []
    for name, png in images.items():
        (out / name).write_bytes(png)
        written.append(out / name)
    (out / "report.md").write_text(to_markdown(doc))
    (out / "report.html").write_text(to_html(doc, f"ablate compare: {c.data['baseline']}"))
    return [out / "report.md", out / "report.html", *written]


def compare(paths: list[str | Path], out: str | Path | None = None, metric: str = "val_loss", at: str = "final",
            baseline: str | None = None, fmt: str = "md", log_x: bool = False) -> tuple[Any, list[Path]]:
    """Build the comparison of the run / sweep dirs and write its report; (Comparison, files)."""
    require(fmt)
    out = Path(out) if out is not None else default_out(paths)
    from eval.compare.report import build
    c = build(paths, metric=metric, at=at, baseline=baseline)
    return c, write(c, out, fmt, log_x)


def summary_text(c: Any) -> str:
    """What the command prints: the arms' metric, the comparisons and the warnings."""
    from eval.compare.document import interval, pvalue, signed, summary
    d = c.data
    lines = [f"{d['metric_label']} at {d['at']} (mean ± standard error over seeds; baseline {d['baseline']}):"]
    width = max(len(n) for n in d["arms"])
    for name, a in d["arms"].items():
        lines.append(f"  {name:<{width}}  {summary(a['metric'])}")
    for x in d["comparisons"]:
        p = f"paired p={pvalue(x['paired']['p'])} (n={x['paired']['n']})" if x["paired"] else "no paired test"
        w = f"Welch p={pvalue(x['welch']['p'])}" if x["welch"] else "no Welch test"
        lines.append(f"  {x['arm']} - {x['baseline']}: {signed(x['diff'])} 95% {interval(x['ci95'])}  {p}  {w}")
    for m in c.messages:
        lines.append(f"warning: {m['kind']}: {m['text']}")
    return "\n".join(lines)
