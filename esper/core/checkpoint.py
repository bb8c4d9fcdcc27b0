"""Checkpoint storage (SPEC §5 C-1, C-2, C-3): safetensors files + a JSON manifest, written atomically,
verified before anything is loaded. Generic: it knows files, hashes and manifests, not the trainer.

Layout::

    <ckpt_root>/
        latest                      # text file holding the name of the last verified checkpoint
        <name>/                     # one checkpoint, e.g. epoch-0003
            <stem>.safetensors      # one per tensor group (model, optimizer, rng, ...)
            manifest.json           # payload + schema_version + per-file sha256/bytes + tensor summary
        .tmp-<name>-<pid>/          # in-flight or crashed write: readers ignore it, the next write removes it

Nothing here unpickles: tensors are read only through safetensors, and only after every file's sha256, size
and header and the manifest's schema have been checked. Paths that are not a checkpoint (a ``.pt`` file, say)
are rejected by name without being opened.

Single writer per ``ckpt_root``: stale ``.tmp-*`` directories are taken to be left by a dead writer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import safetensors.torch
import torch

from esper.core.errors import CheckpointError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
LATEST = "latest"
SUFFIX = ".safetensors"
STRUCTURAL_KEYS = ("schema_version", "files", "tensors", "manifest_sha256")
MAX_MANIFEST_BYTES = 64 << 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_TMP_PREFIX = ".tmp-"
_LATEST_TMP = ".latest.tmp"
# Leading bytes of the formats torch.save / pickle produce; used only to *name* the problem, never to load.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")

FileStatus = Literal["ok", "mismatch", "missing", "corrupt", "unexpected", "unsafe"]


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (I/O error, disk full, failed read-back); the previous checkpoint and the
    ``latest`` pointer are untouched. Exit code 4: a checkpoint problem, not a bug."""


class CheckpointPruneError(CheckpointError):
    """The new checkpoint is committed and ``latest`` points at it, but removing old ones failed."""

    def __init__(self, message: str, checkpoint: Path) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class FileCheck:
    """The verdict on one file of a checkpoint directory."""

    name: str
    status: FileStatus
    detail: str = ""
    expected_bytes: int | None = None
    actual_bytes: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.name, "status": self.status, "detail": self.detail,
            "expected_bytes": self.expected_bytes, "actual_bytes": self.actual_bytes,
        }


@dataclass
class VerifyReport:
    """Everything verification found; ``problems`` name the file and the problem, one string each."""

    path: Path
    manifest: dict[str, Any] | None
    manifest_problems: list[str] = field(default_factory=list)
    files: list[FileCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.manifest_problems and all(f.ok for f in self.files)

    @property
    def unsafe(self) -> bool:
        """A pickle-looking, non-regular or unsafely named file is present (safety, not just damage)."""
        return any(f.status == "unsafe" for f in self.files)

    @property
    def problems(self) -> list[str]:
        out = [f"{MANIFEST}: {p}" for p in self.manifest_problems]
        out += [f"{f.name}: {f.status}: {f.detail}" for f in self.files if not f.ok]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "ok": self.ok,
            "unsafe": self.unsafe,
            "schema_version": (self.manifest or {}).get("schema_version"),
            "manifest": "ok" if not self.manifest_problems else "invalid",
            "files": [f.to_dict() for f in self.files],
            "problems": self.problems,
        }


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint: its directory, manifest and tensors (stem -> key -> CPU tensor)."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, dict[str, torch.Tensor]]

    @property
    def payload(self) -> dict[str, Any]:
        """The manifest without the structural keys this module adds."""
        return {k: v for k, v in self.manifest.items() if k not in STRUCTURAL_KEYS}


# --------------------------------------------------------------------------------------------------- write


def write_checkpoint(
    ckpt_root: Path,
    name: str,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    payload: Mapping[str, Any],
    *,
    keep_last: int,
    before_commit: Callable[[Path], None] | None = None,
) -> Path:
    """Write checkpoint ``ckpt_root/name`` atomically, verify it, move ``latest`` to it, then prune to
    ``keep_last`` (newest by name; the new checkpoint is always kept). Returns the checkpoint directory.

    ``tensors`` maps a file stem to its tensors (each stem becomes ``<stem>.safetensors``); ``payload`` must
    be strict JSON and must not use the structural keys. ``before_commit(tmpdir)`` is a fault/test hook run
    after every file is written and fsynced, before the rename. Raises ValueError/TypeError for caller bugs,
    CheckpointWriteError for I/O failures (previous checkpoint and ``latest`` untouched, temp dir removed),
    and CheckpointPruneError when only the pruning after a successful commit failed.
    """
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    _check_name(name, "checkpoint name")
    if name == LATEST:
        raise ValueError(f"checkpoint name {name!r} is reserved for the pointer")
    blobs, summary = _serialize(tensors)
    manifest_bytes = _manifest_bytes(payload, blobs, summary)

    ckpt_root = Path(ckpt_root)
    target = ckpt_root / name
    tmp = ckpt_root / f"{_TMP_PREFIX}{name}-{os.getpid()}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        previous = _read_pointer(ckpt_root)
        if previous == name:
            raise CheckpointWriteError(
                f"{target}: refusing to overwrite the checkpoint that '{LATEST}' points at")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for fname, data in blobs.items():
            _write_synced(tmp / fname, data)
        _write_synced(tmp / MANIFEST, manifest_bytes)  # last: a directory with a manifest is complete
        _fsync_dir(tmp)
        if before_commit is not None:
            before_commit(tmp)
        if target.exists():
            # A committed directory the pointer never reached (the writer died between rename and pointer
            # move): it is not `latest`, so it can go; moved aside first so no half-deleted dir keeps a name.
            _remove_dir(target, ckpt_root)
        os.rename(tmp, target)
        _fsync_dir(ckpt_root)
    except OSError as exc:
        err = CheckpointWriteError(f"writing checkpoint {target} failed: {exc}")
        _cleanup_after_failure(tmp, err)
        raise err from exc
    except BaseException as exc:
        _cleanup_after_failure(tmp, exc)
        raise

    report = verify_checkpoint(target)
    if not report.ok:
        exc2 = CheckpointWriteError(
            f"checkpoint {target} failed read-back verification: {'; '.join(report.problems)}")
        _cleanup_after_failure(target, exc2, ckpt_root)
        raise exc2

    try:
        _write_synced(ckpt_root / _LATEST_TMP, (name + "\n").encode())
        os.replace(ckpt_root / _LATEST_TMP, ckpt_root / LATEST)
        _fsync_dir(ckpt_root)
    except OSError as exc:
        raise CheckpointWriteError(
            f"checkpoint {target} is written and verified but moving '{LATEST}' to it failed: {exc}") from exc

    try:
        _prune(ckpt_root, keep_last, keep=name)
    except OSError as exc:
        raise CheckpointPruneError(f"checkpoint {target} committed; pruning old checkpoints failed: {exc}",
                                   target) from exc
    return target


def _serialize(
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
) -> tuple[dict[str, bytes], dict[str, dict[str, Any]]]:
    if not tensors:
        raise ValueError("a checkpoint needs at least one tensor file")
    blobs: dict[str, bytes] = {}
    summary: dict[str, dict[str, Any]] = {}
    for stem, group in tensors.items():
        _check_name(stem, "tensor file stem")
        prepared: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for key, t in group.items():
            if not isinstance(key, str):
                raise TypeError(f"{stem}: tensor key {key!r} is not a string")
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{stem}.{key}: expected a torch.Tensor, got {type(t).__name__}")
            prepared[key] = _owned_cpu(t.detach(), seen)
        fname = stem + SUFFIX
        blobs[fname] = safetensors.torch.save(prepared)
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
    return blobs, summary


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


def _manifest_bytes(payload: Mapping[str, Any], blobs: Mapping[str, bytes],
                    summary: Mapping[str, Any]) -> bytes:
    clash = sorted(set(payload) & set(STRUCTURAL_KEYS))
    if clash:
        raise ValueError(f"payload must not set structural manifest keys {clash}")
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **payload}
    doc["files"] = {f: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for f, b in blobs.items()}
    doc["tensors"] = dict(summary)
    try:
        # Strict JSON so any reader (jq, other languages) can parse it; encode non-finite numbers explicitly.
        doc["manifest_sha256"] = _manifest_digest(doc)
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint payload is not strict JSON: {exc}") from exc
    return (text + "\n").encode()


def _manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without this field: a manifest cannot hash its own bytes,
    but an edit or flipped byte that still parses must not pass verification."""
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_dir(path: Path, ckpt_root: Path) -> None:
    """Rename aside to a dot-name readers ignore, then delete: a crash mid-delete leaves a stale temp dir."""
    aside = ckpt_root / f"{_TMP_PREFIX}drop-{path.name}-{os.getpid()}"
    if aside.exists():
        shutil.rmtree(aside)
    os.rename(path, aside)
    shutil.rmtree(aside)


def _cleanup_after_failure(path: Path, exc: BaseException, ckpt_root: Path | None = None) -> None:
    """Remove a failed write's directory; a cleanup failure is attached to the error, not swallowed."""
    if not path.exists():
        return
    try:
        if ckpt_root is None:
            shutil.rmtree(path)
        else:
            _remove_dir(path, ckpt_root)
    except OSError as cleanup_exc:
        exc.add_note(f"also failed to remove {path}: {cleanup_exc}")


def _prune(ckpt_root: Path, keep_last: int, *, keep: str) -> None:
    for entry in ckpt_root.iterdir():
        if entry.name.startswith(_TMP_PREFIX) and entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
    committed = sorted(
        e.name for e in ckpt_root.iterdir()
        if not e.name.startswith(".") and e.is_dir() and not e.is_symlink() and (e / MANIFEST).is_file()
    )
    survivors = set(committed[-keep_last:]) | {keep}
    for name in committed:
        if name not in survivors:
            _remove_dir(ckpt_root / name, ckpt_root)


# --------------------------------------------------------------------------------------------------- resolve


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The checkpoint ``ckpt_root/latest`` points at, or None when there is no pointer yet.

    A malformed or dangling pointer is a CheckpointError (it never silently means "no checkpoint")."""
    ckpt_root = Path(ckpt_root)
    try:
        name = _read_pointer(ckpt_root)
    except OSError as exc:
        raise CheckpointError(f"{ckpt_root / LATEST}: cannot read the pointer: {exc}") from exc
    if name is None:
        return None
    target = ckpt_root / name
    if not target.is_dir():
        raise CheckpointError(f"{ckpt_root / LATEST}: points at {name!r}, which does not exist")
    return target


def _read_pointer(ckpt_root: Path) -> str | None:
    pointer = ckpt_root / LATEST
    if not pointer.exists():
        return None
    if not pointer.is_file():
        raise CheckpointError(f"{pointer}: expected a text file naming the latest checkpoint")
    if pointer.stat().st_size > 256:
        raise CheckpointError(f"{pointer}: too large to be a checkpoint pointer")
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    if not _NAME_RE.match(name) or name == LATEST:
        raise CheckpointError(f"{pointer}: does not hold a valid checkpoint name (got {name!r})")
    return name


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


# --------------------------------------------------------------------------------------------------- verify


def verify_checkpoint(path: Path) -> VerifyReport:
    """Check the manifest (JSON, schema version, structural keys) and every file (name, size, sha256,
    safetensors header, no extra files). Integrity problems are reported, not raised; only "there is no
    checkpoint here" raises CheckpointError."""
    report, _ = _verify(resolve_checkpoint(path), keep_bytes=False)
    return report


def _verify(ckpt: Path, *, keep_bytes: bool) -> tuple[VerifyReport, dict[str, bytes]]:
    manifest, problems = _read_manifest(ckpt / MANIFEST)
    report = VerifyReport(path=ckpt, manifest=manifest, manifest_problems=problems)
    data: dict[str, bytes] = {}
    listed: dict[str, Any] = {}
    if manifest is not None and isinstance(manifest.get("files"), dict):
        listed = manifest["files"]
    for fname, entry in listed.items():
        check, blob = _check_listed(ckpt, fname, entry, keep_bytes=keep_bytes)
        report.files.append(check)
        if blob is not None:
            data[fname] = blob
    for entry in sorted(ckpt.iterdir(), key=lambda p: p.name):
        if entry.name == MANIFEST or entry.name in listed:
            continue
        report.files.append(_check_extra(entry))
    return report, data


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return None, ["not a regular file"]
    if not path.exists():
        return None, ["missing"]
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            return None, [f"{size} bytes, larger than the {MAX_MANIFEST_BYTES}-byte limit"]
        doc = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        return None, [f"unreadable: {exc}"]
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"not valid JSON: {exc}"]
    if not isinstance(doc, dict):
        return None, [f"expected a JSON object, got {type(doc).__name__}"]
    problems: list[str] = []
    version = doc.get("schema_version")
    if "schema_version" not in doc:
        problems.append("missing key 'schema_version'")
    elif type(version) is not int or version != SCHEMA_VERSION:
        problems.append(f"schema_version {version!r} is not supported (this Esper reads {SCHEMA_VERSION})")
    files = doc.get("files")
    if "files" not in doc:
        problems.append("missing key 'files'")
    elif not isinstance(files, dict) or not files:
        problems.append("'files' must be a non-empty object of file name -> {sha256, bytes}")
    else:
        for fname, entry in files.items():
            if not _is_entry(entry):
                problems.append(f"'files.{fname}' must be {{\"sha256\": <64 hex>, \"bytes\": <int >= 0>}}")
    tensors = doc.get("tensors")
    if "tensors" not in doc:
        problems.append("missing key 'tensors'")
    elif not isinstance(tensors, dict):
        problems.append("'tensors' must be an object")
    elif isinstance(files, dict) and set(tensors) != set(files):
        problems.append(f"'tensors' lists {sorted(tensors)} but 'files' lists {sorted(files)}")
    recorded = doc.get("manifest_sha256")
    if "manifest_sha256" not in doc:
        problems.append("missing key 'manifest_sha256'")
    else:
        try:
            actual = _manifest_digest(doc)
        except ValueError as exc:  # NaN/Infinity literals: never written by write_checkpoint
            problems.append(f"not strict JSON: {exc}")
        else:
            if recorded != actual:
                problems.append("content does not match its manifest_sha256 (edited or corrupted)")
    return doc, problems


def _is_entry(entry: Any) -> bool:
    if not isinstance(entry, dict):
        return False
    sha, size = entry.get("sha256"), entry.get("bytes")
    return isinstance(sha, str) and bool(_SHA_RE.match(sha)) and type(size) is int and size >= 0


def _check_listed(ckpt: Path, fname: str, entry: Any, *, keep_bytes: bool) -> tuple[FileCheck, bytes | None]:
    if not (fname.endswith(SUFFIX) and _NAME_RE.match(fname)):
        return FileCheck(fname, "unsafe", f"invalid file name in the manifest (must be <name>{SUFFIX})"), None
    path = ckpt / fname
    expected = entry.get("bytes") if _is_entry(entry) else None
    if path.is_symlink() or (path.exists() and not path.is_file()):
        return FileCheck(fname, "unsafe", "not a regular file", expected), None
    if not path.exists():
        return FileCheck(fname, "missing", "listed in the manifest but absent", expected), None
    try:
        with open(path, "rb") as f:
            blob = f.read() if keep_bytes else None
            if blob is not None:
                digest, size = hashlib.sha256(blob).hexdigest(), len(blob)
            else:
                digest, size = hashlib.file_digest(f, "sha256").hexdigest(), f.tell()
    except OSError as exc:
        return FileCheck(fname, "missing", f"unreadable: {exc}", expected), None
    header_problem = _safetensors_problem(path)
    if header_problem is not None:
        if _looks_pickled(path):
            return FileCheck(fname, "unsafe", "is a pickle/torch.save archive, not safetensors; it is never "
                                              "unpickled", expected, size), None
        return FileCheck(fname, "corrupt", f"not a valid safetensors file: {header_problem}",
                         expected, size), None
    if expected is None:
        return FileCheck(fname, "mismatch", "manifest entry is malformed; cannot verify", None, size), None
    if size != expected:
        return FileCheck(fname, "mismatch", f"size {size} bytes, manifest says {expected} (truncated or "
                                            "extended)", expected, size), None
    if digest != entry["sha256"]:
        return FileCheck(fname, "mismatch", f"sha256 {digest[:12]}… differs from the manifest's "
                                            f"{entry['sha256'][:12]}…", expected, size), None
    return FileCheck(fname, "ok", "", expected, size), blob


def _check_extra(path: Path) -> FileCheck:
    if path.is_symlink() or not path.is_file():
        return FileCheck(path.name, "unsafe", "unexpected entry, not a regular file, not in the manifest")
    size = path.stat().st_size
    if _safetensors_problem(path) is not None and _looks_pickled(path):
        return FileCheck(path.name, "unsafe", "unexpected pickle/torch.save file not listed in the manifest; "
                                              "it is never unpickled", None, size)
    return FileCheck(path.name, "unexpected", "not listed in the manifest", None, size)


def _looks_pickled(path: Path) -> bool:
    """Name the problem by the file's leading bytes; asked only of files that are not valid safetensors
    (a valid header's length may itself start with 0x80)."""
    try:
        with open(path, "rb") as f:
            return f.read(4).startswith(_PICKLE_MAGIC)
    except OSError:
        return False  # unreadable: reported as corrupt/unexpected by the caller, not as a pickle


def _safetensors_problem(path: Path) -> str | None:
    """Parse (only) the safetensors header with the library itself; None when it is well formed."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            f.keys()
    except safetensors.SafetensorError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable: {exc}"
    return None


# --------------------------------------------------------------------------------------------------- load


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Resolve and verify everything, then deserialize the very bytes that were hashed (no re-read between
    check and use). Any problem is a CheckpointError naming the file and the problem."""
    ckpt = resolve_checkpoint(path)
    report, data = _verify(ckpt, keep_bytes=True)
    if not report.ok:
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {'; '.join(report.problems)}")
    assert report.manifest is not None  # ok implies a parsed manifest
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for fname, blob in data.items():
        try:
            tensors[fname.removesuffix(SUFFIX)] = safetensors.torch.load(blob)
        except safetensors.SafetensorError as exc:
            raise CheckpointError(f"{ckpt / fname}: not loadable as safetensors: {exc}") from exc
    missing = set(report.manifest["files"]) - set(data)
    if missing:  # pragma: no cover - report.ok guarantees every listed file was read
        raise CheckpointError(f"checkpoint {ckpt}: files not read: {sorted(missing)}")
    return LoadedCheckpoint(path=ckpt, manifest=report.manifest, tensors=tensors)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"{what} {name!r} must match {_NAME_RE.pattern} (no path separator, no leading dot)")


__all__ = [
    "LATEST", "MANIFEST", "SCHEMA_VERSION", "CheckpointPruneError", "CheckpointWriteError", "FileCheck",
    "LoadedCheckpoint", "VerifyReport", "latest_checkpoint", "load_checkpoint", "resolve_checkpoint",
    "verify_checkpoint", "write_checkpoint",
]
