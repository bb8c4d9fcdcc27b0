"""One writer per run directory (S-5): an exclusive lock held for a whole ``train`` or resume.

The lock is an advisory ``flock`` on ``run.lock`` (through the ``filelock`` package), so it dies with its
process: a SIGKILLed writer never leaves a stale lock behind. Readers (``watch``, ``runs``, ``plot``) never
take it; :func:`writer_alive` asks whether somebody holds it without getting in a writer's way.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from types import TracebackType

from filelock import FileLock, Timeout

from esper.core.errors import EsperError, ExitCode

LOCK_NAME = "run.lock"
# A reader's probe holds a shared lock for microseconds; a writer waits this long before calling the directory
# busy, so a probe never turns a real writer away, while a second real writer is refused within a second.
_ACQUIRE_S = 1.0


# Run directories this process holds the lock of (resolved paths): a checkpoint writer prunes another writer's
# temp files only where it holds the lock, so it can know that writer is dead.
_HELD: set[Path] = set()


def held_here(run_dir: Path) -> bool:
    """Whether this process holds ``run_dir``'s writer lock (so no other process can be writing it)."""
    return Path(run_dir).resolve() in _HELD


class RunDirBusy(EsperError):
    """Another process is writing this run directory."""

    exit_code = ExitCode.BUSY


def lock_path(run_dir: Path) -> Path:
    return run_dir / LOCK_NAME


class RunLock:
    """Exclusive hold on a run directory for the life of the ``with`` block."""

    def __init__(self, run_dir: Path) -> None:
        self.path = lock_path(run_dir)
        self._lock: FileLock | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        if self.path.is_symlink():
            raise RunDirBusy(f"{self.path} is a symbolic link; refusing to lock through it")
        lock = FileLock(str(self.path), timeout=_ACQUIRE_S)
        try:
            lock.acquire()
        except Timeout as exc:
            raise RunDirBusy(f"run directory {self.path.parent} is in use by another esper process "
                             f"(it holds {self.path}); wait for it to end or pick another directory") from exc
        self._lock = lock
        _HELD.add(self.path.parent.resolve())

    def release(self) -> None:
        if self._lock is not None:
            _HELD.discard(self.path.parent.resolve())
            self._lock.release()
            self._lock = None

    @property
    def held(self) -> bool:
        return self._lock is not None


def writer_alive(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's writer lock (never blocks, never takes it for long)."""
    path = lock_path(run_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return False  # a symlink is never a lock Esper took
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor drops the probe's shared lock, if it got one
    return False
