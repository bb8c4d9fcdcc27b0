"""Atomic checkpoint writes (SPEC C-2, P-4): each file written from the tensors' own memory and hashed while it
is written (one pass, ``stream.write_file``), fsynced, manifest last, renamed into place, directory fsynced,
then the ``latest`` pointer replaced atomically and old checkpoints pruned to ``keep_last`` (a committed
checkpoint is never deleted before its successor is committed). Nothing is read back: a read of bytes just
written comes from the page cache and proves nothing about the disk; the proof is the verified load (and the
checkpointer's re-verification of ``latest`` before it relies on it).

Layout::

    <ckpt_root>/
        latest                      # text file holding the name of the last verified checkpoint
        <name>/                     # one checkpoint, e.g. epoch-0003
            <stem>.safetensors      # one per tensor group (model, optimizer, rng, ...)
            manifest.json           # payload + schema_version + per-file digest/bytes + tensor summary
        .tmp-<name>-<pid>-<token>/  # in-flight or crashed write: readers ignore it

Temp names are unique (pid and a random token), so two writers can never share one. A ``.tmp-*`` entry is
removed by pruning only when this process holds the run directory's writer lock (``esper.core.records.runlock``): then
no other process can be writing here and every other temp was left by a dead writer. Without the lock (a store
used on its own) pruning leaves other writers' temps alone. No committed checkpoint is deleted before its
successor has been renamed into place.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from esper.core.checkpoint import stream
from esper.core.checkpoint.locate import BEST, LATEST, POINTERS, SUFFIX, TMP_PREFIX, check_name, read_pointer
from esper.core.checkpoint.manifest import MANIFEST
from esper.core.checkpoint.manifest import encode as encode_manifest
from esper.core.errors import CheckpointError
from esper.core.io import durable
from esper.core.records.runlock import held_here

_IN_FLIGHT: set[str] = set()  # temp names this process is writing right now (never pruned)


def _temp_name(what: str) -> str:
    return f"{TMP_PREFIX}{what}-{os.getpid()}-{secrets.token_hex(4)}"


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (I/O error, disk full); the previous checkpoint and the
    ``latest`` pointer are untouched. Exit code 4: a checkpoint problem, not a bug."""


class CheckpointPruneError(CheckpointError):
    """The new checkpoint is committed and ``latest`` points at it, but removing old ones failed."""

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


def write_checkpoint(
    ckpt_root: Path,
    name: str,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    payload: Mapping[str, Any],
    *,
    keep_last: int,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``ckpt_root/name`` atomically, move ``latest`` to it, then prune to
    ``keep_last`` (newest by name; the new checkpoint is always kept). Returns the checkpoint directory.

    ``tensors`` maps a file stem to its tensors (each stem becomes ``<stem>.safetensors``); ``payload`` must
    be strict JSON and must not use the structural keys. ``before_commit(tmpdir)`` is a fault/test hook run
    after every file is written and fsynced, before the rename. Raises ValueError/TypeError for caller bugs,
    CheckpointWriteError for I/O failures (previous checkpoint and ``latest`` untouched, temp dir removed),
    and CheckpointPruneError when only the pruning after a successful commit failed.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    check_name(name, "checkpoint name")
    if name in POINTERS:
        raise ValueError(f"checkpoint name {name!r} is reserved for a pointer")
    prepared, summary = _prepare(tensors)
    placeholder = {"algorithm": stream.WRITE_ALGORITHM, "digest": "0" * 64, "bytes": 0}
    encode_manifest(payload, {f: placeholder for f in prepared}, summary)  # caller bugs fail before any I/O

    ckpt_root = Path(ckpt_root)
    target = ckpt_root / name
    tmp = ckpt_root / _temp_name(name)
    pointer_tmp = ckpt_root / _temp_name(LATEST)
    _IN_FLIGHT.update((tmp.name, pointer_tmp.name))
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        previous = read_pointer(ckpt_root)
        if previous == name:
            raise CheckpointWriteError(
                f"{target}: refusing to overwrite the checkpoint that '{LATEST}' points at")
        tmp.mkdir()
        entries: dict[str, dict[str, Any]] = {}
        for fname, group in prepared.items():
            digest, nbytes = stream.write_file(tmp / fname, group, sync=False)
            entries[fname] = {"algorithm": stream.WRITE_ALGORITHM, "digest": digest, "bytes": nbytes}
        manifest_bytes = encode_manifest(payload, entries, summary, checked=True)
        stream.write_bytes(tmp / MANIFEST, manifest_bytes)  # last: a directory with a manifest is complete
        # the pointer's new content too (a dot-name readers ignore until it replaces `latest` after the commit)
        stream.write_bytes(pointer_tmp, (name + "\n").encode())
        # every file and the temp dir made durable together: the fsyncs run at once (one journal commit where
        # the file system groups them), all of them finished before the rename that commits
        durable.fsync_many([*(tmp / f for f in entries), tmp / MANIFEST, pointer_tmp], dirs=[tmp])
        if before_commit is not None:
            before_commit(tmp)
        _commit(tmp, target, ckpt_root)
    except OSError as exc:
        err = CheckpointWriteError(f"writing checkpoint {target} failed: {exc}")
        _cleanup_after_failure(tmp, err)
        _cleanup_after_failure(pointer_tmp, err)
        raise err from exc
    except BaseException as exc:
        _cleanup_after_failure(tmp, exc)
        _cleanup_after_failure(pointer_tmp, exc)
        raise
    finally:
        _IN_FLIGHT.discard(tmp.name)
        _IN_FLIGHT.discard(pointer_tmp.name)

    try:
        os.replace(pointer_tmp, ckpt_root / LATEST)
        durable.fsync_dir(ckpt_root)
    except OSError as exc:
        err = CheckpointWriteError(
            f"checkpoint {target} is written but moving '{LATEST}' to it failed: {exc}")
        _cleanup_after_failure(pointer_tmp, err)
        raise err from exc

    prune(ckpt_root, keep_last, keep=name)
    return target


def prune(ckpt_root: Path, keep_last: int, *, keep: str) -> None:
    """Remove committed checkpoints beyond the newest ``keep_last``, never ``keep`` nor the one ``best`` names.
    CheckpointPruneError when removing failed (``keep`` stays committed)."""
    target = ckpt_root / keep
    try:
        _prune(ckpt_root, keep_last, keep=keep)
    except OSError as exc:
        raise CheckpointPruneError(f"checkpoint {target} committed; pruning old checkpoints failed: {exc}",
                                   target) from exc
    except CheckpointError as exc:  # a damaged `best` pointer: which checkpoint it protects is unknown, keep all
        raise CheckpointPruneError(f"checkpoint {target} committed; nothing pruned: {exc}", target) from exc


def write_pointer(ckpt_root: Path, which: str, name: str) -> None:
    """Point ``which`` (``best``) at the committed checkpoint ``name``: written beside it and made durable, then
    renamed over the old pointer, so a reader sees the old name or the new one, never a torn file."""
    if which not in POINTERS or which == LATEST:
        raise ValueError(f"{which!r} is not a pointer write_pointer moves ({BEST!r}; 'latest' moves with a write)")
    check_name(name, "checkpoint name")
    if not (ckpt_root / name / MANIFEST).is_file():
        raise ValueError(f"{ckpt_root / name}: not a committed checkpoint")
    tmp = ckpt_root / _temp_name(which)
    _IN_FLIGHT.add(tmp.name)
    try:
        stream.write_bytes(tmp, (name + "\n").encode())
        durable.fsync_many([tmp], dirs=[])
        os.replace(tmp, ckpt_root / which)
        durable.fsync_dir(ckpt_root)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        _IN_FLIGHT.discard(tmp.name)


def _prepare(
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, Any]]]:
    """Each file's tensors as the writer needs them (``_owned_cpu``) and the manifest's summary of them."""
    if not tensors:
        raise ValueError("a checkpoint needs at least one tensor file")
    files: dict[str, dict[str, torch.Tensor]] = {}
    summary: dict[str, dict[str, Any]] = {}
    for stem, group in tensors.items():
        check_name(stem, "tensor file stem")
        prepared: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, t in group.items():
            if not isinstance(key, str):
                raise TypeError(f"{stem}: tensor key {key!r} is not a string")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{stem}.{key}: expected a torch.Tensor, got {type(t).__name__}")
            prepared[key] = _owned_cpu(t.detach(), seen)
        fname = stem + SUFFIX
        files[fname] = prepared
        dtypes: dict[str, int] = {}
        for t in prepared.values():
            d = str(t.dtype).removeprefix("torch.")
            dtypes[d] = dtypes.get(d, 0) + 1
        summary[fname] = {
            "count": len(prepared),
            "parameters": sum(t.numel() for t in prepared.values()),
            "bytes": sum(t.numel() * t.element_size() for t in prepared.values()),
            "dtypes": dtypes,
        }
    return files, summary


def _owned_cpu(t: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """The tensor as safetensors needs it: contiguous, on the CPU, alone in a storage it fully covers.

    Only tensors that are not already so are copied (the copy was a fifth of a checkpoint write's time).
    """
    storage = t.untyped_storage()
    complete = storage.nbytes() == t.numel() * t.element_size()
    if (t.device.type == "cpu" and t.is_contiguous() and complete and storage.data_ptr() not in seen
            and t.numel() > 0):
        seen.add(storage.data_ptr())
        return t
    return t.to(device="cpu", memory_format=torch.contiguous_format, copy=True)


def _commit(tmp: Path, target: Path, ckpt_root: Path) -> None:
    """Rename the finished temp dir to ``target``. A committed directory already there (one the pointer never
    reached: a writer died between rename and pointer move, or a rollback trains the position again) is moved
    aside first and deleted only once its successor has its name; if the rename fails it is put back."""
    aside = None
    if os.path.lexists(target):
        aside = ckpt_root / _temp_name(f"drop-{target.name}")
        os.rename(target, aside)
    try:
        os.rename(tmp, target)
    except BaseException:
        if aside is not None:
            os.rename(aside, target)
        raise
    durable.fsync_dir(ckpt_root)
    if aside is not None:
        shutil.rmtree(aside)


def _remove_dir(path: Path, ckpt_root: Path) -> None:
    """Rename aside to a dot-name readers ignore, then delete: a crash mid-delete leaves a stale temp dir."""
    aside = ckpt_root / _temp_name(f"drop-{path.name}")
    os.rename(path, aside)
    shutil.rmtree(aside)


def _cleanup_after_failure(path: Path, exc: BaseException, ckpt_root: Path | None = None) -> None:
    """Remove a failed write's directory; a cleanup failure is attached to the error, not swallowed."""
    if not os.path.lexists(path):
        return
    try:
        if ckpt_root is None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        else:
            _remove_dir(path, ckpt_root)
    except OSError as cleanup_exc:
        exc.add_note(f"also failed to remove {path}: {cleanup_exc}")


def _prune(ckpt_root: Path, keep_last: int, *, keep: str) -> None:
    if held_here(ckpt_root.parent):  # no other writer can be alive here: its temps are a dead writer's
        for entry in ckpt_root.iterdir():
            if entry.name.startswith(TMP_PREFIX) and entry.name not in _IN_FLIGHT:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
    committed = sorted(
        e.name for e in ckpt_root.iterdir()
        if not e.name.startswith(".") and e.is_dir() and not e.is_symlink() and (e / MANIFEST).is_file()
    )
    best = read_pointer(ckpt_root, BEST)  # checkpoint.keep_best: never pruned while it is the best
    survivors = set(committed[-keep_last:]) | {keep} | ({best} if best is not None else set())
    for name in committed:
        if name not in survivors:
            _remove_dir(ckpt_root / name, ckpt_root)


# --------------------------------------------------------------------------------------------------- resolve
