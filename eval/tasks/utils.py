"""Dataset loaders for the local task YAMLs (lm-eval `custom_dataset`), reading local files only.

lm-eval calls each loader with the task's metadata as keyword arguments: `data_dir` (the folder
holding hellaswag/ and arc_easy/) or `val_docs` (a jsonl of {"text": ...}). Kept free of ablate
imports so that the folder works as a plain lm-eval include path.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

HELLASWAG_GLOB = "hellaswag_val_full*.txt"
ARC_FILES = {"test": "ARC-Easy-test.jsonl", "validation": "ARC-Easy-validation.jsonl"}


def _need(value: Any, key: str, task: str) -> Path:
    if not value:
        raise ValueError(f"{task} needs metadata '{key}' (ablate eval: --{key.replace('_', '-')} / eval.{key})")
    return Path(value).expanduser()


# ----------------------------------------------------------------------------- HellaSwag
def hellaswag_files(data_dir: str | Path) -> list[Path]:
    """The 6-line-format parts in order (a single hellaswag_val_full.txt works too)."""
    root = Path(data_dir).expanduser()
    folder = root / "hellaswag" if (root / "hellaswag").is_dir() else root
    return sorted(folder.glob(HELLASWAG_GLOB))


def preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`, applied to every field as lm-eval does."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    text = text.replace("  ", " ")
    return text


def capitalize_last_fragment(line: str) -> str:
    """Approximate lm-eval's `ctx_b.capitalize()`: the file joins ctx_a and ctx_b, and ctx_b is
    the unfinished last sentence, so a lowercase fragment after the last sentence end is taken
    to be ctx_b and capitalised (lowercasing the rest of it, as str.capitalize does)."""
    cut = max(line.rfind(". "), line.rfind("? "), line.rfind("! "))
    if cut < 0:
        return line
    head, tail = line[:cut + 2], line[cut + 2:]
    return head + tail.capitalize() if tail[:1].islower() else line


def parse_hellaswag(lines: list[str]) -> list[dict[str, Any]]:
    """6 lines per item: `activity_label: ctx`, gold label, 4 endings."""
    if len(lines) % 6:
        raise ValueError(f"hellaswag text has {len(lines)} lines, not a multiple of 6")
    docs = []
    for i in range(0, len(lines), 6):
        query, label, *endings = lines[i:i + 6]
        docs.append({"query": preprocess(capitalize_last_fragment(query)),
                     "choices": [preprocess(e) for e in endings], "label": int(label)})
    return docs


def read_hellaswag(data_dir: str | Path) -> list[dict[str, Any]]:
    files = hellaswag_files(data_dir)
    if not files:
        raise FileNotFoundError(f"no {HELLASWAG_GLOB} under {data_dir} or {data_dir}/hellaswag")
    lines: list[str] = []
    for f in files:
        lines += f.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    return parse_hellaswag(lines)


def load_hellaswag(data_dir: str | None = None, **_: Any):
    import datasets
    docs = read_hellaswag(_need(data_dir, "data_dir", "ablate_hellaswag"))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(docs)})


# ----------------------------------------------------------------------------- ARC-Easy
def arc_files(data_dir: str | Path) -> dict[str, Path]:
    root = Path(data_dir).expanduser()
    folder = root / "arc_easy" if (root / "arc_easy").is_dir() else root
    return {split: folder / name for split, name in ARC_FILES.items()}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_arc_easy(data_dir: str | None = None, **_: Any):
    import datasets
    files = arc_files(_need(data_dir, "data_dir", "ablate_arc_easy"))
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"ablate_arc_easy: missing {', '.join(missing)}")
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_jsonl(p)) for split, p in files.items()})


# ----------------------------------------------------------------------------- run's own validation text
def load_val_docs(val_docs: str | None = None, **_: Any):
    import datasets
    rows = _jsonl(_need(val_docs, "val_docs", "ablate_val_ppl"))
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})
