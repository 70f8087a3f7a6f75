"""One process per run dir: an exclusive lock on RUN_DIR/.lock for the life of a training.

Two trainers on one run dir (a command started twice, a Slurm requeue that starts while the old
job is still exiting) would write and delete the same checkpoint directories and interleave
metrics rows. The lock is an `fcntl.flock` on `.lock`, which also records host:pid for the
message; the kernel releases it when its process dies, so a stale lock of a dead process is
simply taken over. Only rank 0 takes it; every rank fails together when it is held.
"""
from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from models.registry import ConfigError

LOCK = ".lock"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._fd: int | None = None
        self._made_dir = False

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the holder (exit 2)."""
        run_dir = self.path.parent
        if run_dir.exists() and not run_dir.is_dir():
            raise ConfigError("--run-dir", f"{run_dir} exists and is not a directory")
        self._made_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            host, _, pid = holder.partition(":")
            raise ConfigError("--run-dir", f"run dir {run_dir} is in use by pid {pid or '?'} on host {host} "
                                           f"(lock {self.path}); wait for it to finish or use another --run-dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()}:{os.getpid()}\n".encode())
        os.fsync(fd)
        self._fd = fd

    def release(self, keep_dir: bool = True) -> None:
        """Drop the lock; with keep_dir=False a run dir this lock created (and nothing else wrote
        into) is removed again, so a run that failed before its setup finished leaves nothing."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None
        run_dir = self.path.parent
        if not keep_dir and self._made_dir and [p.name for p in run_dir.iterdir()] == [LOCK]:
            self.path.unlink(missing_ok=True)
            run_dir.rmdir()

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
