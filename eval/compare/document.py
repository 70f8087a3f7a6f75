"""The report as a document: the same blocks written as report.md (images beside it) and as a
self-contained report.html (images embedded as data: URIs, no links: it opens offline and can
be mailed as one file)."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from typing import Any

from eval.compare.arms import short_key
from eval.compare.report import Comparison

DASH = "—"


# ----------------------------------------------------------------------------- number formats
def count(x: Any) -> str:
    """45216 -> 45.2K, 1.24e8 -> 124M."""
    if x is None:
        return DASH
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def digits_for(x: float) -> int:
    return 4 if abs(x) < 10 else 2 if abs(x) < 1000 else 0


def num(x: Any, digits: int | None = None) -> str:
    if x is None:
        return DASH
    return f"{x:,.{digits_for(x) if digits is None else digits}f}"


def pvalue(p: Any) -> str:
    return DASH if p is None else f"{p:.3g}"


def summary(s: dict[str, Any], fmt: Any = None, exact: bool = False) -> str:
    """mean ± standard error (n), the error with the mean's decimals; one value: mean (n=1);
    none: —. exact: a value every run shares (a parameter count) is shown alone."""
    if not s or s.get("mean") is None:
        return DASH
    if fmt is None:
        d = digits_for(s["mean"])
        fmt = lambda x: num(x, d)        # noqa: E731
    if exact and s.get("sem") in (None, 0.0):
        return fmt(s["mean"])
    if s.get("sem") is None:
        return f"{fmt(s['mean'])} (n={s['n']})"
    return f"{fmt(s['mean'])} ± {fmt(s['sem'])} (n={s['n']})"


def percent(x: Any) -> str:
    return DASH if x is None else f"{100 * x:.1f}%"


def interval(ci: Any) -> str:
    return DASH if not ci else f"[{num(ci[0])}, {num(ci[1])}]"


def signed(x: Any) -> str:
    return DASH if x is None else ("+" if x > 0 else "") + num(x)


def _n(k: int, noun: str) -> str:
    return f"{k} {noun}{'' if k == 1 else 's'}"


# ----------------------------------------------------------------------------- document
@dataclass
class Doc:
    blocks: list[tuple[Any, ...]] = field(default_factory=list)
    images: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", level, text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def items(self, items: list[str]) -> None:
        if items:
            self.blocks.append(("ul", items))

    def table(self, headers: list[str], rows: list[list[str]]) -> None:
        if rows:
            self.blocks.append(("table", headers, rows))

    def img(self, name: str, caption: str) -> None:
        if name in self.images:
            self.blocks.append(("img", name, caption))


def build_doc(c: Comparison, images: dict[str, bytes] | None = None) -> Doc:
    d, data = Doc(images=dict(images or {})), c.data
    arms = data["arms"]
    n_runs = sum(len(a["runs"]) for a in arms.values())
    title = ", ".join(data["sweeps"]) or ", ".join(data["inputs"])
    d.h(1, f"Comparison: {title}")
    d.p(f"metric: {data['metric_label']} ({'lower' if data['lower_is_better'] else 'higher'} is better) at "
        f"{data['at']}; baseline: {data['baseline']}; {_n(len(arms), 'arm')}, {_n(n_runs, 'run')}. "
        "Means are over seeds, ± one standard error, with n; intervals are 95% t intervals.")
    if c.messages:
        d.h(2, "Warnings")
        d.items([f"{m['kind']}: {m['text']}" for m in c.messages])

    d.h(2, "Arms")
    keys = sorted({k for a in c.arms for k in a.config})     # each key by its shortest tail no other key has
    d.table(["arm", "n", "seeds", "done", "tokens", data["metric_label"], "config"],
            [[name, str(len(a["runs"])), ", ".join(str(r["seed"]) for r in a["runs"]),
              f"{sum(r['status'] == 'done' for r in a['runs'])}/{len(a['runs'])}", count(a["tokens"]["mean"]),
              summary(a["metric"]), ", ".join(f"{short_key(k, keys)}={v}" for k, v in a["differs"].items()) or DASH]
             for name, a in arms.items()])

    if data["comparisons"]:
        d.h(2, "Against the baseline")
        d.p(f"difference = arm − baseline in {data['metric_label']}; interval and method: paired when every "
            "seed is shared (two or more), else Welch's over every run; the paired test uses the shared seeds.")
        d.table(["arm", "baseline", "difference", "95% interval", "method", "paired p (n)", "Welch p",
                 "better (interval excludes 0)"],
                [[x["arm"], x["baseline"], signed(x["diff"]), interval(x["ci95"]), x["method"] or DASH,
                  f"{pvalue(x['paired']['p'])} ({x['paired']['n']})" if x["paired"] else DASH,
                  pvalue(x["welch"]["p"]) if x["welch"] else DASH,
                  "arm" if x["better"] == x["arm"] else "baseline" if x["better"] else "unresolved"]
                 for x in data["comparisons"]])
        comps = data["comparisons"]
        common = [n for n in comps[0]["notes"] if len(comps) > 1 and all(n in x["notes"] for x in comps)]
        d.items([f"every comparison: {n}" for n in common]
                + [f"{x['arm']} vs {x['baseline']}: {'; '.join(n for n in x['notes'] if n not in common)}"
                   for x in comps if set(x["notes"]) - set(common)])

    sets = list(dict.fromkeys(s for a in arms.values() for s in a["val"]))
    if sets:
        d.h(2, "Validation")
    for s in sets:
        fields = list(dict.fromkeys(f for a in arms.values() for f in a["val"].get(s, {})))
        d.h(3, s)
        d.table(["arm", *fields], [[name, *(summary(a["val"].get(s, {}).get(f, {})) for f in fields)]
                                   for name, a in arms.items()])

    keys = sorted({(e["task"], e["metric"], e["hash8"]) for a in arms.values() for e in a["eval"]})
    if keys:
        d.h(2, "lm-eval")
        lookup = {(n, e["task"], e["metric"], e["hash8"]): e for n, a in arms.items() for e in a["eval"]}
        d.table(["task", "metric", "settings", *arms],
                [[t, m, h, *(summary(lookup.get((n, t, m, h), {})) for n in arms)] for t, m, h in keys])

    d.h(2, "Model and throughput")
    d.p("counts and FLOPs/token from the runs' `model` event; tokens/s and MFU: the median over train rows "
        "(the first left out); memory: the peak.")
    d.table(["arm", "params", "non-embedding", "memory params", "FLOPs/token", "tokens/s", "MFU", "peak mem (GB)"],
            [[name, *(summary(m[k], count, exact=True) for k in ("params", "non_embedding", "memory_params",
                                                                  "flops_per_token", "tokens_per_s")),
              summary(m["mfu"], percent, exact=True), summary(m["mem_gb"], lambda x: num(x, 2), exact=True)]
             for name, a in arms.items() for m in [a["model"]]])

    series = list(dict.fromkeys(s for a in arms.values() for s in a["probes"]))
    if series:
        d.h(2, "Probes")
        d.p("mean over layers of each probe (from the probe rows of metrics.jsonl and `ablate probe`'s "
            "RUN_DIR/probes/ files, the newest at or before the point); per layer in the plots.")
        d.table(["probe", *arms], [[s, *(summary(a["probes"].get(s, {}).get("mean", {})) for a in arms.values())]
                                   for s in series])
        for s in series:
            d.img(f"probe_{s}.png", f"probe {s} per layer")

    d.h(2, "Curves")
    d.img("loss_vs_tokens.png", "train and validation loss vs tokens (mean over seeds, ± one standard error)")
    d.img("loss_vs_time.png", "train and validation loss vs wall time")

    if data["grid"] or data["compute"]:
        d.h(2, "Grid")
        d.img("compute.png", f"{data['metric_label']} vs training FLOPs across sizes (log-log)")
        for key, lines in data["grid"].items():
            d.h(3, key)
            d.table(["line", f"best {key}", data["metric_label"]],
                    [[ln["label"], str(ln["best"]), next((summary(p) for p in ln["points"] if p["x"] == ln["best"]),
                                                         DASH)] for ln in lines])
            d.img(f"grid_{key}.png", f"{data['metric_label']} vs {key}")

    d.h(2, "Runs")
    d.table(["arm", "run", "seed", "status", "step", "tokens"],
            [[name, r["dir"], str(r["seed"]),
              r["status"] + (f" ({r['status_text']})" if r["status_text"] and r["status"] != "done" else ""),
              f"{r['step']}/{r['planned_steps']}", count(r["tokens"])]
             for name, a in arms.items() for r in a["runs"]])
    return d


# ----------------------------------------------------------------------------- writers
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        if b[0] == "h":
            out.append("#" * b[1] + " " + b[2])
        elif b[0] == "p":
            out.append(b[1])
        elif b[0] == "ul":
            out.append("\n".join(f"- {i}" for i in b[1]))
        elif b[0] == "table":
            head, rows = b[1], b[2]
            lines = ["| " + " | ".join(map(_md_cell, head)) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(map(_md_cell, r)) + " |" for r in rows]
            out.append("\n".join(lines))
        elif b[0] == "img":
            out.append(f"![{b[2]}]({b[1]})")
    return "\n\n".join(out) + "\n"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}img{max-width:100%;display:block;margin:.5em 0}figcaption{color:#555;font-size:.9em}
li{margin:.2em 0}"""


def to_html(doc: Doc, title: str = "ablate compare") -> str:
    e = html.escape
    out = [f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
           f"<style>{STYLE}</style></head><body>"]
    for b in doc.blocks:
        if b[0] == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            data = base64.b64encode(doc.images[b[1]]).decode("ascii")
            out.append(f"<figure><img alt=\"{e(b[2])}\" src=\"data:image/png;base64,{data}\">"
                       f"<figcaption>{e(b[2])}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
