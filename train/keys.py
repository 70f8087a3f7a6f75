"""The config key reference (`ablate config keys`, docs/reference.md) and `ablate config diff`.

Every key's documentation is the trailing `#` comment on its dataclass field's line (continued
on following comment-only lines indented past the field), read from the source, so the
reference cannot drift from the code: the dataclasses are the single place a key is described.
Sections whose keys depend on a kind are opened too: each registered mixer kind's keys under
`model.layers.mixers.<LETTER>`, each registered data source's under `data.<name>`.

    python -m train.keys                          # print the generated markdown
    python -m train.keys --write docs/reference.md   # rewrite its generated part only
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Iterator

import yaml

from models.registry import MIXERS, ConfigError, suggest
from models.schema import optional_section, to_dict, type_name

MIXERS_KEY = "model.layers.mixers"        # letter -> a mixer config whose keys depend on its kind
LETTER = "<LETTER>"
DATA_SECTION = "data"                     # the registered sources' sections live under it
BEGIN, END = "<!-- keys:begin -->", "<!-- keys:end -->"
REGENERATE = "python -m train.keys --write docs/reference.md"


@dataclass(frozen=True)
class KeyRow:
    key: str            # full dotted key (`model.layers.mixers.<LETTER>.window` for a mixer kind's key)
    type: str           # the annotation as users write values (models.schema.type_name)
    default: str        # YAML flow style; "required" when the field has no default
    doc: str            # the field's trailing comment ("" when it has none)
    owner: str          # module.Class that defines the field (names the culprit of a missing doc)
    variant: str = ""   # "kind: attention" for a mixer kind's keys, else ""


# ----------------------------------------------------------------------------- reading the source
@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: doc} of a dataclass from its source: the `#` comment on the field's line(s),
    joined with the comment-only lines right after it that are indented past the field (a
    comment-only line at the field's own indent belongs to what follows, not to this field)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments: dict[int, tuple[int, str]] = {}        # line -> (column, text) of its comment
    code_lines: set[int] = set()                     # lines holding anything but a comment
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = (tok.start[1], tok.string.lstrip("#").strip())
        elif tok.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    (node,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)]
    docs: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        lines = range(stmt.lineno, stmt.end_lineno + 1)
        parts = [comments[i][1] for i in lines if i in comments]
        line = stmt.end_lineno + 1
        while parts and line in comments and line not in code_lines and comments[line][0] > stmt.col_offset:
            parts.append(comments[line][1])
            line += 1
        docs[stmt.target.id] = " ".join(p for p in parts if p)
    return docs


def format_value(value: Any) -> str:
    """A value as YAML flow style, the way a config file or `ablate config show` writes it."""
    text = yaml.safe_dump(to_dict(value), default_flow_style=True, sort_keys=False, width=10**9).strip()
    return text[: -len("...")].strip() if text.endswith("\n...") else text


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return format_value(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return format_value(f.default_factory())
    return "required"


# ----------------------------------------------------------------------------- open sections
def source_sections() -> dict[str, type]:
    """{name: config dataclass} of the registered data sources, each the section `data.<name>`;
    {} without a source registry (train/data/source.py), when sections are plain nested fields."""
    if importlib.util.find_spec("train.data.source") is None:
        return {}
    module = importlib.import_module("train.data.source")
    registry = getattr(module, "registered_sources", lambda: module.SOURCES)()   # built-ins imported
    return {name: cls for name in registry.names() if (cls := registry.config_class(name)) is not None}


def _mixer_rows() -> Iterator[KeyRow]:
    """Each registered mixer kind's keys, as `model.layers.mixers.<LETTER>.<key>`."""
    for kind in MIXERS.names():
        cls = MIXERS.config_class(kind)
        if cls is not None:
            yield from _section_rows(cls, f"{MIXERS_KEY}.{LETTER}", f"kind: {kind}")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _section_rows(cls: type, prefix: str = "", variant: str = "") -> Iterator[KeyRow]:
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    owner = f"{cls.__module__}.{cls.__qualname__}"
    opened = source_sections() if prefix == DATA_SECTION else {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = _join(prefix, f.name)
        tp = opened.pop(f.name, None) or hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _section_rows(tp, key, variant)
            continue
        yield KeyRow(key, type_name(tp), _default(f), docs.get(f.name, ""), owner, variant)
        if key == MIXERS_KEY:
            yield from _mixer_rows()
        if (section := optional_section(tp)) is not None:       # `Section | None`: its keys too
            yield from _section_rows(section, key, variant)
    for name, section in opened.items():         # sources that are not fields of the data section
        yield from _section_rows(section, _join(prefix, name), variant)


# ----------------------------------------------------------------------------- the reference
def all_rows() -> list[KeyRow]:
    """Every key of the run config, in the dataclasses' field order."""
    from train.config import Config
    return list(_section_rows(Config))


def key_rows(section: str | None = None) -> list[KeyRow]:
    """The keys under `section` (a dotted prefix, or one key; None: all). A real letter in a
    mixer key (`model.layers.mixers.A`) reads as <LETTER>. An unknown section is a ConfigError
    naming it with a close match."""
    rows = all_rows()
    if not section:
        return rows
    wanted = re.sub(rf"^{re.escape(MIXERS_KEY)}\.[A-Za-z](?=\.|$)", f"{MIXERS_KEY}.{LETTER}", section.strip("."))
    picked = [r for r in rows if r.key == wanted or r.key.startswith(wanted + ".")]
    if not picked:
        known = sorted({".".join(r.key.split(".")[:i]) for r in rows for i in range(1, r.key.count(".") + 2)})
        raise ConfigError(section, f"no such config section or key{suggest(wanted, known)}")
    return picked


def format_keys(rows: list[KeyRow]) -> str:
    """Aligned `key  type  default  doc` lines; a kind's keys under a heading (`kind: attention`)."""
    def width(column: str, cap: int) -> int:          # a longer cell pushes the rest of its line only
        return min(max((len(getattr(r, column)) for r in rows), default=0), cap)

    wk, wt, wd = width("key", 44), width("type", 24), width("default", 16)
    lines: list[str] = []
    variant = ""
    for r in rows:
        if r.variant != variant:
            lines += ["", r.variant] if r.variant else [""]
            variant = r.variant
        lines.append(f"{r.key:<{wk}}  {r.type:<{wt}}  {r.default:<{wd}}  {r.doc}".rstrip())
    return "\n".join(lines).strip("\n")


def _cell(text: str, code: bool = False) -> str:
    """A markdown table cell: `|` escaped; outside code, `<x>` is text (not an HTML tag)."""
    text = text.replace("|", "\\|")
    if code:
        return f"`{text}`" if text else text
    return text.replace("<", "&lt;")


def reference_markdown() -> str:
    """The generated part of docs/reference.md: one table per top-level section (and per mixer
    kind), from the same rows as `ablate config keys`."""
    blocks: dict[tuple[str, str], list[KeyRow]] = {}
    for r in all_rows():
        section = r.key.split(".")[0] if "." in r.key else ""
        blocks.setdefault((section, r.variant), []).append(r)
    order = sorted(blocks, key=lambda b: b[0] != "")        # the top-level keys first, else field order
    out = []
    for section, variant in order:
        if variant:
            title = f"`{MIXERS_KEY}.{LETTER}` ({variant})"
        else:
            title = f"`{section}`" if section else "Top-level keys"
        out += [f"### {title}", "", "| key | type | default | doc |", "|---|---|---|---|"]
        out += [f"| {_cell(r.key, True)} | {_cell(r.type, True)} | {_cell(r.default, True)} | {_cell(r.doc)} |"
                for r in blocks[(section, variant)]]
        out.append("")
    return "\n".join(out)


def replace_generated(text: str, generated: str) -> str:
    """`text` with the part between the keys markers replaced (a ConfigError without them)."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ConfigError("", f"no '{BEGIN}' ... '{END}' lines to replace")
    return text[: start + len(BEGIN)] + "\n" + generated.strip("\n") + "\n" + text[end:]


def generated_part(text: str) -> str | None:
    """What lies between the keys markers (None without them), to compare with reference_markdown()."""
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        return None
    return text[start + len(BEGIN): end].strip("\n")


# ----------------------------------------------------------------------------- config diff
def resolved_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(resolved config as a dict, code_version or None) of a config file or a run dir, so that a
    run dir and the config file it was trained from compare equal (derived keys included)."""
    from train.config import RECORD_KEYS, config_from_dict, load_config, resolve_config
    from train.rundir import RunDir
    path = Path(path)
    if path.is_dir():
        run = RunDir(path)
        if not run.exists():
            raise ConfigError("", f"{path} is neither a config file nor a run directory (no config.yaml)")
        data = run.read_config()
        records = {key: data.pop(key, None) for key in RECORD_KEYS}
        cfg = config_from_dict(data)
        version = records.get("code_version")
    else:
        cfg, version = load_config(path), None
    resolve_config(cfg)
    return cfg.to_dict(), version


def config_diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """`key: A_value -> B_value` for each dotted key whose values differ (`(absent)` where one
    side lacks it, e.g. a mixer letter), in config order."""
    from train.config import flatten
    fa, fb = flatten(a), flatten(b)
    absent = object()
    return [f"{k}: {_side(fa, k)} -> {_side(fb, k)}"
            for k in [*fa, *(k for k in fb if k not in fa)] if fa.get(k, absent) != fb.get(k, absent)]


def diff_report(a: str | Path, b: str | Path) -> str:
    """`ablate config diff A B`: the differing resolved keys (or "no differences"), then a note
    of the run dirs' code versions, which are records, not config."""
    (da, va), (db, vb) = resolved_config(a), resolved_config(b)
    lines = config_diff(da, db) or ["no differences"]
    if va is not None or vb is not None:
        lines.append(f"note: code_version {_version(va)} -> {_version(vb)} (a record, not compared)")
    return "\n".join(lines)


def _side(flat: dict[str, Any], key: str) -> str:
    return format_value(flat[key]) if key in flat else "(absent)"


def _version(v: dict[str, Any] | None) -> str:
    if v is None:
        return "(config file)"
    sha = v.get("git_sha")
    return "(outside git)" if sha is None else f"{sha[:12]}{' (dirty)' if v.get('dirty') else ''}"


# ----------------------------------------------------------------------------- python -m train.keys
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.keys", description="the generated config key reference")
    p.add_argument("--write", metavar="FILE", help="rewrite FILE's part between the keys markers")
    args = p.parse_args(argv)
    generated = reference_markdown()
    if not args.write:
        print(generated, end="")
        return 0
    path = Path(args.write)
    try:
        path.write_text(replace_generated(path.read_text(), generated))
    except (OSError, ConfigError) as e:
        print(f"python -m train.keys: error: {path}: {e}", file=sys.stderr)
        return 2
    print(f"wrote the key reference into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
