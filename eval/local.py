"""The local tasks in eval/tasks/: what input each needs, their data fingerprints, and the
run's own validation documents as text (the input of `ablate_val_ppl`)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from models.registry import ConfigError
from train.rundir import RunDir, atomic_write

TASK_DIR = Path(__file__).resolve().parent / "tasks"
HELLASWAG, ARC_EASY, VAL_PPL = "ablate_hellaswag", "ablate_arc_easy", "ablate_val_ppl"
LOCAL_TASKS = (HELLASWAG, ARC_EASY, VAL_PPL)
DATA_DIR_TASKS = (HELLASWAG, ARC_EASY)


def val_docs_path(run: RunDir) -> Path:
    return run.path / "eval" / "data" / "val_docs.jsonl"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_files(task: str, data_dir: str | None, run: RunDir) -> list[Path]:
    """The files a local task reads; ConfigError naming --data-dir when they are missing."""
    from eval.tasks import utils

    if task == VAL_PPL:
        return [val_docs_path(run)]
    if not data_dir:
        raise ConfigError("--data-dir", f"task {task} reads local files: give --data-dir (or eval.data_dir), "
                                        "a folder holding hellaswag/ and arc_easy/ (e.g. ../shared/data/eval)")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise ConfigError("--data-dir", f"{data_dir} is not a folder (task {task})")
    if task == HELLASWAG:
        files = utils.hellaswag_files(root)
        if not files:
            raise ConfigError("--data-dir", f"task {task}: no {utils.HELLASWAG_GLOB} in {root} or {root}/hellaswag")
        return files
    files = list(utils.arc_files(root).values())
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise ConfigError("--data-dir", f"task {task}: missing {', '.join(missing)}")
    return files


def data_fingerprint(tasks: list[str], data_dir: str | None, run: RunDir) -> dict[str, Any]:
    """sha256 of every local file a task reads: results from other data are never reused."""
    out = {}
    for task in tasks:
        if task in LOCAL_TASKS:
            out[task] = {p.name: _sha256(p) for p in data_files(task, data_dir, run)}
    return out


def write_val_docs(run: RunDir, tokenizer: Any, val_data: Any = None) -> Path:
    """RUN_DIR/eval/data/val_docs.jsonl: the decoded text of each validation document, once.

    `val_data` is the run's validation TokenData (the trainer has it); without it the run's
    data is prepared again from its config (a cache hit when the token cache is still there).
    Every rank may call this: the write is atomic and the content identical.
    """
    path = val_docs_path(run)
    if path.exists():
        return path
    if val_data is None:
        from train.data import prepare_data
        from train.runtime import load_run_config
        val_data = prepare_data(load_run_config(run.path), progress=False).val
    tokens, starts = val_data.tokens, list(val_data.doc_starts) + [len(val_data.tokens)]
    lines = []
    for lo, hi in zip(starts[:-1], starts[1:]):
        text = tokenizer.decode([int(t) for t in tokens[lo:hi]], skip_special_tokens=True)
        if text.strip():
            lines.append(json.dumps({"text": text}, ensure_ascii=False))
    if not lines:
        raise ConfigError(VAL_PPL, f"the run at {run.path} has no validation documents (data.val_fraction is 0 "
                                   "or the validation split is empty)")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(lines) + "\n")
    return path
