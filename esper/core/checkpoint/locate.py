"""Where checkpoints are: names, the ``latest`` pointer, and turning what an operator typed into a checkpoint dir."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from esper.core.checkpoint.manifest import MANIFEST
from esper.core.errors import CheckpointError
from esper.core.io import confine

LATEST = "latest"
BEST = "best"  # checkpoint.keep_best: the checkpoint with the best primary metric so far
POINTERS = (LATEST, BEST)
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MAX_POINTER = 256


def check_name(name: str, what: str) -> None:
    """ValueError unless ``name`` is a plain file name (no separator, no leading dot, bounded)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must match {NAME_RE.pattern} (no path separator, no leading dot)")


def read_pointer(ckpt_root: Path, which: str = LATEST) -> str | None:
    """The checkpoint name the pointer ``which`` (``latest``, ``best``) holds, or None when there is none yet. The
    pointer is read as outside input: no symbolic link, a regular file of at most 256 bytes, and its content is
    never quoted back."""
    pointer = ckpt_root / which
    try:
        raw = confine.read_bytes(pointer, _MAX_POINTER)
    except FileNotFoundError:
        return None
    except confine.UnsafePath as exc:
        raise CheckpointError(f"{pointer}: {str(exc).removeprefix(str(pointer)).strip()} (expected a small text file "
                              f"naming the {which} checkpoint)") from None
    try:
        name = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        name = ""
    if not NAME_RE.match(name) or name in POINTERS:
        raise CheckpointError(f"{pointer}: does not hold a valid checkpoint name ({len(raw)} bytes; expected one "
                              f"name matching {NAME_RE.pattern})")
    return name


def latest_checkpoint(ckpt_root: Path, which: str = LATEST) -> Path | None:
    """The checkpoint ``ckpt_root/latest`` (or the pointer ``which``) points at, or None when there is no pointer.

    A malformed or dangling pointer, or one naming a symbolic link, is a CheckpointError (it never silently
    means "no checkpoint")."""
    ckpt_root = Path(ckpt_root)
    try:
        name = read_pointer(ckpt_root, which)
    except OSError as exc:
        raise CheckpointError(f"{ckpt_root / which}: cannot read the pointer: {exc.strerror or exc}") from exc
    if name is None:
        return None
    try:
        target = confine.walk(ckpt_root, name)
        confine.check_entry(target, kind="dir")
    except FileNotFoundError:
        raise CheckpointError(f"{ckpt_root / which}: points at {name!r}, which does not exist") from None
    except confine.UnsafePath as exc:
        raise CheckpointError(f"{ckpt_root / which}: points at {name!r}: {exc}") from None
    return target


def resolve_checkpoint(path: Path) -> Path:
    """Turn a checkpoint dir, a run dir, a checkpoints dir or a manifest.json path into the checkpoint dir.

    Anything else (e.g. a ``.pt`` file) is a CheckpointError naming the path; it is never opened. The path is taken
    as typed; no symbolic link is followed at or below it (S-2)."""
    path = Path(path)
    expected = ("expected a checkpoint directory, a run directory, a checkpoints directory with a "
                f"'{LATEST}' pointer, or a {MANIFEST}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory ({expected})") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CheckpointError(f"{path} is a symbolic link; Esper follows no link to or inside a checkpoint "
                              "(pass the real path)")
    if stat.S_ISREG(st.st_mode):
        if path.name == MANIFEST:
            return _checked_dir(path.parent)
        hint = " (Esper never loads pickle files such as torch.save .pt/.pth)" \
            if path.suffix.lower() in {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"} else ""
        raise CheckpointError(f"{path}: not a checkpoint: {expected}, got a file{hint}")
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: not a checkpoint: {expected}")
    if _has(path, MANIFEST) or any(e.name.endswith(SUFFIX) for e in _entries(path)):
        return path
    for root in (path, path / "checkpoints"):
        if root != path and not _has(path, "checkpoints"):
            continue
        if root != path and confine.is_link(root):
            raise CheckpointError(f"{root} is a symbolic link; Esper follows no link inside a run directory")
        if _has(root, LATEST):
            target = latest_checkpoint(root)
            if target is None:  # pragma: no cover - the pointer was just seen
                raise CheckpointError(f"{root}: no '{LATEST}' pointer")
            return target
    if _has(path, "checkpoints"):
        raise CheckpointError(f"{path}: run directory has no verified checkpoint yet "
                              f"({path / 'checkpoints' / LATEST} is missing)")
    raise CheckpointError(f"{path}: not a checkpoint: {expected}")


def _entries(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be listed: {exc.strerror or exc}") from None


def _has(directory: Path, name: str) -> bool:
    """Whether ``directory`` holds an entry ``name`` (a link counts: it is refused where it is used)."""
    try:
        os.lstat(directory / name)
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        return False
    return True


def _checked_dir(path: Path) -> Path:
    if confine.is_link(path):
        raise CheckpointError(f"{path} is a symbolic link; Esper follows no link to or inside a checkpoint")
    return path
