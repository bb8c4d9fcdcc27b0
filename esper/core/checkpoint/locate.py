"""Where checkpoints are: names, the ``latest`` pointer, and turning what an operator typed into a checkpoint dir."""

from __future__ import annotations

import re
from pathlib import Path

from esper.core.checkpoint.manifest import MANIFEST
from esper.core.errors import CheckpointError

LATEST = "latest"
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str, what: str) -> None:
    """ValueError unless ``name`` is a plain file name (no separator, no leading dot, bounded)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must match {NAME_RE.pattern} (no path separator, no leading dot)")


def read_pointer(ckpt_root: Path) -> str | None:
    """The checkpoint name ``latest`` holds, or None when there is no pointer yet."""
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise CheckpointError(f"{pointer}: expected a text file naming the latest checkpoint")
    if pointer.stat().st_size > 256:
        raise CheckpointError(f"{pointer}: too large to be a checkpoint pointer")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not NAME_RE.match(name) or name == LATEST:
        raise CheckpointError(f"{pointer}: does not hold a valid checkpoint name (got {name!r})")
    return name


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint ``ckpt_root/latest`` points at, or None when there is no pointer yet.

    A malformed or dangling pointer is a CheckpointError (it never silently means "no checkpoint")."""
    ckpt_root = Path(ckpt_root)
    try:
        name = read_pointer(ckpt_root)
    except OSError as exc:
        raise CheckpointError(f"{ckpt_root / LATEST}: cannot read the pointer: {exc}") from exc
    if name is None:
        return None
    target = ckpt_root / name
    if not target.is_dir():
        raise CheckpointError(f"{ckpt_root / LATEST}: points at {name!r}, which does not exist")
    return target


def resolve_checkpoint(path: Path) -> Path:
    """Turn a checkpoint dir, a run dir, a checkpoints dir or a manifest.json path into the checkpoint dir.

    Anything else (e.g. a ``.pt`` file) is a CheckpointError naming the path; it is never opened."""
    path = Path(path)
    expected = ("expected a checkpoint directory, a run directory, a checkpoints directory with a "
                f"'{LATEST}' pointer, or a {MANIFEST}")
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or directory ({expected})")
    if path.is_file():
        if path.name == MANIFEST:
            return path.parent
        hint = " (Esper never loads pickle files such as torch.save .pt/.pth)" \
            if path.suffix.lower() in {".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt"} else ""
        raise CheckpointError(f"{path}: not a checkpoint: {expected}, got a file{hint}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint: {expected}")
    if (path / MANIFEST).exists() or any(path.glob("*" + SUFFIX)):
        return path
    for root in (path, path / "checkpoints"):
        if (root / LATEST).exists():
            target = latest_checkpoint(root)
            if target is None:  # pragma: no cover - exists() was just checked
                raise CheckpointError(f"{root}: no '{LATEST}' pointer")
            return target
    if (path / "checkpoints").is_dir():
        raise CheckpointError(f"{path}: run directory has no verified checkpoint yet "
                              f"({path / 'checkpoints' / LATEST} is missing)")
    raise CheckpointError(f"{path}: not a checkpoint: {expected}")
