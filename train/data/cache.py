"""The cache folder: where it is, and building an entry exactly once, atomically.

Layout under the cache root (`data.cache_dir`, else `$ABLATE_CACHE`, else `~/.cache/ablate`):

    index/<hash>.json          cheap description of the inputs -> full description (fingerprint.py)
    tokenizers/<key>/          a tokenizer folder (tokenizer.json, tokenizer_config.json, meta.json)
    tokens/<key>/              train.bin, val.bin (raw uint16/uint32), *.docs.npy, meta.json
    builds.log                 one JSON line per entry built (when, which process, how long)

An entry is built in a temporary sibling folder and renamed into place only when complete,
under an fcntl lock on `.<key>.lock`, so concurrent processes (a sweep on a shared file system)
build it once and a failed build never replaces or half-writes a good entry.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from train.data.errors import DataError

CACHE_VERSION = 1
META = "meta.json"


def cache_root(cache_dir: str | None) -> Path:
    """`data.cache_dir`, else $ABLATE_CACHE, else ~/.cache/ablate."""
    root = cache_dir or os.environ.get("ABLATE_CACHE") or "~/.cache/ablate"
    return Path(os.path.expanduser(root)).resolve()


@contextlib.contextmanager
def file_lock(path: Path, progress: bool = False) -> Iterator[bool]:
    """An exclusive fcntl (POSIX) lock, which NFS v4 and Lustre honour, held for the block.

    Yields whether the lock is held (False on a file system without locks).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        locked = True
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EACCES):  # held by another process: wait for it
                if progress:
                    print(f"waiting for another process building {path.name[1:-5]} ...", file=sys.stderr)
                fcntl.lockf(f, fcntl.LOCK_EX)
            else:  # a file system without locks (ENOLCK): the rename below still keeps entries whole
                print(f"warning: cannot lock {path} ({e.strerror}); concurrent builds may duplicate work",
                      file=sys.stderr)
                locked = False
        try:
            yield locked
        finally:
            if locked:
                fcntl.lockf(f, fcntl.LOCK_UN)


def write_json(path: Path, obj: Any) -> None:
    """Write through a temporary file and a rename, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_meta(entry: Path) -> dict[str, Any]:
    """An entry's meta.json, checked: complete and written by this cache version."""
    try:
        meta = json.loads((entry / META).read_text())
    except (OSError, ValueError):
        raise DataError(str(entry), f"cache entry has no readable {META} (not written by ablate, or "
                        "damaged); delete the folder or set data.cache_dir to another place") from None
    version = meta.get("version")
    if version != CACHE_VERSION:
        raise DataError(str(entry), f"cache entry written by cache version {version!r}; this ablate "
                        f"reads version {CACHE_VERSION}. Delete the folder (it is rebuilt) or set "
                        "data.cache_dir to another place")
    return meta


def _log_build(root: Path, entry: Path, seconds: float) -> None:
    line = json.dumps({"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": socket.gethostname(),
                       "pid": os.getpid(), "entry": f"{entry.parent.name}/{entry.name}",
                       "seconds": round(seconds, 3)})
    with open(root / "builds.log", "a") as f:
        f.write(line + "\n")


def build_once(root: Path, entry: Path, build: Callable[[Path], dict[str, Any]],
               progress: bool = False) -> tuple[dict[str, Any], bool]:
    """The entry's meta, building it first if absent. Returns (meta, whether this call built it).

    `build(tmp)` writes the files into `tmp` and returns the meta (the version is added).
    """
    if entry.exists():
        return read_meta(entry), False
    with file_lock(entry.parent / f".{entry.name}.lock", progress) as locked:
        if entry.exists():  # another process built it while we waited
            return read_meta(entry), False
        if locked:  # holding the lock, any temporary folder of this entry is a killed build's
            for stale in entry.parent.glob(f".{entry.name}.tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        try:
            meta = {**build(tmp), "version": CACHE_VERSION}
            write_json(tmp / META, meta)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.rename(tmp, entry)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if not entry.exists():
                raise
            return read_meta(entry), False  # without a working lock, another process was first
        _log_build(root, entry, time.perf_counter() - start)
    return read_meta(entry), True
