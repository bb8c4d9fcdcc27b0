"""Paths read through a run directory stay inside it (S-2).

A run directory (and a checkpoint directory) is outside input: whoever could write it could plant a symbolic
link (``checkpoints -> /elsewhere``, ``latest -> /etc/shadow``) or a FIFO that blocks a reader forever. Esper
takes the path the operator typed as given and then follows no link below it: every component under that root
is checked with ``lstat`` and files are opened with ``O_NOFOLLOW | O_NONBLOCK`` and checked to be regular files
on the open descriptor, so what is read is what was checked. Messages name the path, never what a file holds.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from esper.core.errors import EsperError


class UnsafePath(EsperError):
    """A path under a run or checkpoint directory is a symbolic link, not a regular file, or leaves the root.
    Callers re-raise it as their own error (a checkpoint error, a skipped record)."""


def check_entry(path: Path, *, kind: str) -> os.stat_result:
    """``lstat`` of ``path``: UnsafePath when it is a symbolic link or not of ``kind`` (``"dir"``/``"file"``);
    FileNotFoundError when it does not exist."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePath(f"{path} is a symbolic link; Esper follows no link inside a run or checkpoint directory")
    want = stat.S_ISDIR if kind == "dir" else stat.S_ISREG
    if not want(st.st_mode):
        raise UnsafePath(f"{path} is not a {'directory' if kind == 'dir' else 'regular file'}")
    return st


def is_link(path: Path) -> bool:
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def walk(root: Path, *parts: str) -> Path:
    """``root/parts...`` after checking that no component below ``root`` (nor ``root`` itself) is a symbolic
    link and no part climbs out (``..``, a separator, an absolute path). Components that do not exist yet are
    fine (the caller finds out when it opens them)."""
    path = Path(root)
    if is_link(path):
        raise UnsafePath(f"{path} is a symbolic link; pass the real path")
    for part in parts:
        if not part or part in (".", "..") or os.sep in part or (os.altsep and os.altsep in part):
            raise UnsafePath(f"{path}: {part!r} is not a plain name inside it")
        path = path / part
        if is_link(path):
            raise UnsafePath(f"{path} is a symbolic link; Esper follows no link inside a run or checkpoint "
                             "directory")
    return path


def open_regular(path: Path, *, follow: bool = False) -> BinaryIO:
    """Open ``path`` for reading: a symbolic link (unless ``follow``: a file the operator named, like a config)
    or anything but a regular file is UnsafePath (a FIFO is never waited on); OSError as the system gives it
    otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if not follow and is_link(path):
            raise UnsafePath(f"{path} is a symbolic link; Esper follows no link inside a run or checkpoint "
                             "directory") from None
        raise exc
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UnsafePath(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: Path, limit: int, *, follow: bool = False) -> bytes:
    """A regular file's bytes, refused (UnsafePath) when it holds more than ``limit`` bytes: never read whole."""
    with open_regular(path, follow=follow) as fh:
        size = os.fstat(fh.fileno()).st_size
        if size > limit:
            raise UnsafePath(f"{path} is {size} bytes, larger than the {limit}-byte limit for it")
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UnsafePath(f"{path} grew past the {limit}-byte limit while it was read")
    return data
