"""The `embedded` corpus: text that ships with every Python installation.

No network and no files outside the Python installation, so the quickstart and the tests run
anywhere. It is the help topics of `pydoc_data` (the language reference as prose: about 0.5 MB
of English) followed by the standard library's own `.py` sources (code, comments and
docstrings; about 10 MB on CPython 3.11 without tests), one document per topic or file. The
sources come in an order fixed by a hash of their relative paths, so the `data.embedded.max_bytes`
cap (6 MB by default) samples the whole library rather than its first letters. The corpus is
deterministic for a given Python installation; its fingerprint covers the Python version and
the files' contents.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Any, Iterator

EMBEDDED_VERSION = 1
# Tests, third-party packages, codec tables (long tables of hex escapes) and the topics module
# itself (already included as text) are left out.
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
             "encodings", "pydoc_data", "lib-dynload"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _topics() -> dict[str, str]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip it
        return {}
    return dict(topics)


def stdlib_files() -> list[Path]:
    """The standard library's `.py` files, in the corpus order (by a hash of the relative path)."""
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not d.startswith((".", "config-"))]
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    rel = {f: f.relative_to(root).as_posix() for f in files}
    return sorted(files, key=lambda f: (hashlib.sha256(rel[f].encode()).hexdigest(), rel[f]))


def embedded_docs(max_bytes: int) -> Iterator[str]:
    """The documents, in order, while they fit in `max_bytes` (UTF-8) altogether."""
    used = 0

    def fits(text: str) -> bool:
        nonlocal used
        n = len(text.encode("utf-8"))
        if not text.strip() or used + n > max_bytes:
            return False
        used += n
        return True

    topics = _topics()
    for name in sorted(topics):
        if fits(topics[name]):
            yield topics[name]
    for path in stdlib_files():
        text = path.read_bytes().decode("utf-8", errors="replace")
        if fits(text):
            yield text


def embedded_description(max_bytes: int, full: bool) -> dict[str, Any]:
    """Identifies the corpus: cheaply by file stats, fully by a hash of all candidate documents."""
    files = stdlib_files()
    root = stdlib_root()
    desc: dict[str, Any] = {"kind": "embedded", "version": EMBEDDED_VERSION, "max_bytes": max_bytes,
                            "python": sys.version, "implementation": platform.python_implementation()}
    h = hashlib.sha256()
    topics = _topics()
    for name in sorted(topics):
        h.update(name.encode() + b"\0" + topics[name].encode() + b"\0")
    for f in files:
        rel = f.relative_to(root).as_posix()
        if full:
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
        else:
            st = f.stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    desc["content" if full else "stats"] = h.hexdigest()
    if not full:
        desc["stdlib"] = str(root)
    return desc
