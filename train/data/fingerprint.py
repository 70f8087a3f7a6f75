"""Finding input files and fingerprinting them.

A cache key must change whenever an input changes, yet computing it should not mean reading
a large corpus at every start. Inputs are therefore described twice: cheaply (paths, sizes,
mtimes) and fully (sha256 of the contents). A small index in the cache maps a cheap
description to the full one, so a start only hashes contents the first time it sees a given
set of file stats (or always, with `full_hash=True` as in `ablate data prepare`). Keys come
from the full description, so a corpus moved or copied elsewhere finds its old cache.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable

from train.data.errors import DataError

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TOKEN_SUFFIXES = (".bin", ".npy")


def hash_obj(obj: Any, n: int = 16) -> str:
    """A short stable hash of a JSON-able object (the cache directory names)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    """Whether a file name has one of `suffixes` (an empty tuple accepts any file)."""
    return not suffixes or name.lower().endswith(suffixes)


def _describe(suffixes: tuple[str, ...]) -> str:
    return "/".join(suffixes) + " files" if suffixes else "files"


def _files_under(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames)
                   if not f.startswith(".") and _matches(f, suffixes))
    return out


def resolve_paths(patterns: Iterable[str], suffixes: tuple[str, ...], key: str) -> list[Path]:
    """Files named by `patterns` (files, folders searched recursively, globs), sorted, deduplicated.

    Raises DataError naming the pattern when it matches nothing, so a typo fails at once.
    """
    files: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            matches = [Path(m) for m in sorted(glob.glob(expanded, recursive=True))]
            found = [m for m in matches if m.is_file() and _matches(m.name, suffixes)]
            for m in matches:
                if m.is_dir():
                    found.extend(_files_under(m, suffixes))
            if not found:
                raise DataError(key, f"no {_describe(suffixes)} match '{pattern}'")
            files.extend(found)
            continue
        path = Path(expanded)
        if path.is_dir():
            found = _files_under(path, suffixes)
            if not found:
                raise DataError(key, f"folder '{pattern}' holds no {_describe(suffixes)}")
            files.extend(found)
        elif path.is_file():
            if not _matches(path.name, suffixes):
                raise DataError(str(path), f"unsupported file type '{path.suffix}'; expected one of "
                                f"{', '.join(suffixes)}")
            files.append(path)
        else:
            raise DataError(key, f"path not found: '{pattern}'")
    seen: set[Path] = set()
    unique = []
    for f in files:
        r = f.resolve()
        if r not in seen:
            seen.add(r)
            unique.append(r)
    return unique


def sha256_file(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=65536)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Memoized within one `prepare_data` call (which clears it first, so a full hash rereads
    files edited in place): the tokenizer's key and the tokens' key share the work."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def clear_hash_memo() -> None:
    _sha256.cache_clear()


def file_entry(path: Path, full: bool) -> dict[str, Any]:
    """Cheap: path, size and mtime. Full: the suffix (it picks the parser) and the content hash."""
    if full:
        return {"suffix": path.suffix.lower(), "sha256": sha256_file(path)}
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def content_id(index_dir: Path, describe: Callable[[bool], dict[str, Any]], force_full: bool) -> dict[str, Any]:
    """The full description of the inputs, from the index when their cheap description is known.

    `describe(full)` returns the cheap (False) or full (True) description.
    """
    cheap = describe(False)
    entry = index_dir / f"{hash_obj(cheap, 32)}.json"
    if not force_full and entry.is_file():
        try:
            return json.loads(entry.read_text())["full"]
        except (OSError, ValueError, KeyError):
            pass  # unreadable index entry: recompute it
    full = describe(True)
    index_dir.mkdir(parents=True, exist_ok=True)
    tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"cheap": cheap, "full": full}, sort_keys=True, indent=1))
    os.replace(tmp, entry)
    return full
