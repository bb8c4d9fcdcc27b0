"""Durability, in one place: the fsync calls every writer (checkpoints, JSONL logs, the bench's baselines) uses."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def fsync_file(path: Path) -> None:
    """Make a file's contents durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (a file just created or renamed into it) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it before returning."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_many(files: Sequence[Path], dirs: Sequence[Path] = ()) -> None:
    """fsync every file and directory, concurrently (one thread each): a journaling file system commits
    concurrent fsyncs together, so several small files cost about one fsync's latency, not one each. Returns
    when all are durable; the first failure is raised after every fsync has ended."""
    jobs = [(p, os.O_RDONLY) for p in files] + [(d, os.O_RDONLY | os.O_DIRECTORY) for d in dirs]
    if len(jobs) <= 1:
        for path, flags in jobs:
            _fsync(path, flags)
        return
    with ThreadPoolExecutor(max_workers=len(jobs), thread_name_prefix="esper-fsync") as pool:
        futures = [pool.submit(_fsync, path, flags) for path, flags in jobs]
    for f in futures:
        f.result()


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
