"""Verified reads (SPEC C-3): every file's name, size, sha256 and safetensors header and the manifest's schema
and seal are checked before a tensor is used; tensors are then made from the very bytes that were hashed.

Nothing here unpickles. A file that is not valid safetensors is *named* a pickle by its leading bytes, never
opened as one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import safetensors.torch
import torch

from esper.core.checkpoint.locate import NAME_RE, SUFFIX, resolve_checkpoint
from esper.core.checkpoint.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest, validate
from esper.core.errors import CheckpointError

FileStatus = Literal["ok", "mismatch", "missing", "corrupt", "unexpected", "unsafe"]
# Leading bytes of the formats torch.save / pickle produce; used only to *name* the problem, never to load.
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")


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
    """Everything verification found; ``problems`` name the file and the problem, one string each.

    ``manifest`` is the model when the manifest fits its schema (also when its seal is broken: inspect shows
    a tampered manifest for triage, flagged as invalid)."""

    path: Path
    manifest: Manifest | None
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
            "schema_version": self.manifest.schema_version if self.manifest is not None else None,
            "manifest": "ok" if not self.manifest_problems else "invalid",
            "files": [f.to_dict() for f in self.files],
            "problems": self.problems,
        }


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A verified checkpoint: its directory, manifest and tensors (stem -> key -> CPU tensor)."""

    path: Path
    manifest: Manifest
    tensors: dict[str, dict[str, torch.Tensor]]

    @property
    def payload(self) -> dict[str, Any]:
        """The manifest without the envelope this package adds."""
        return self.manifest.payload()


def verify_checkpoint(path: Path) -> VerifyReport:
    """Check the manifest (JSON, schema, seal) and every file (name, size, sha256, safetensors header, no
    extra files). Integrity problems are reported, not raised; only "there is no checkpoint here" raises
    CheckpointError."""
    report, _ = _verify(resolve_checkpoint(path), keep_bytes=False)
    return report


def load_checkpoint(path: Path) -> LoadedCheckpoint:
    """Resolve and verify everything, then deserialize the very bytes that were hashed (no re-read between
    check and use). Any problem is a CheckpointError naming the file and the problem."""
    ckpt = resolve_checkpoint(path)
    report, data = _verify(ckpt, keep_bytes=True)
    if not report.ok:
        raise CheckpointError(f"checkpoint {ckpt} failed verification: {'; '.join(report.problems)}")
    assert report.manifest is not None  # ok implies a manifest that fits its schema
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for fname, blob in data.items():
        try:
            tensors[fname.removesuffix(SUFFIX)] = safetensors.torch.load(blob)
        except safetensors.SafetensorError as exc:
            raise CheckpointError(f"{ckpt / fname}: not loadable as safetensors: {exc}") from exc
    missing = set(report.manifest.files) - set(data)
    if missing:  # pragma: no cover - report.ok guarantees every listed file was read
        raise CheckpointError(f"checkpoint {ckpt}: files not read: {sorted(missing)}")
    return LoadedCheckpoint(path=ckpt, manifest=report.manifest, tensors=tensors)


def _verify(ckpt: Path, *, keep_bytes: bool) -> tuple[VerifyReport, dict[str, bytes]]:
    doc, problems = _read_manifest(ckpt / MANIFEST)
    manifest = None
    if doc is not None:
        manifest, problems = validate(doc)
    report = VerifyReport(path=ckpt, manifest=manifest, manifest_problems=problems)
    data: dict[str, bytes] = {}
    # the files the document lists, even when the rest of it fails its schema: each is still checked
    listed: dict[str, Any] = doc["files"] if doc is not None and isinstance(doc.get("files"), dict) else {}
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
    return doc, []


def _entry(entry: Any) -> FileEntry | None:
    try:
        return FileEntry.model_validate(entry)
    except ValueError:  # pydantic's ValidationError
        return None


def _check_listed(ckpt: Path, fname: str, raw_entry: Any, *, keep_bytes: bool) -> tuple[FileCheck, bytes | None]:
    if not (fname.endswith(SUFFIX) and NAME_RE.match(fname)):
        return FileCheck(fname, "unsafe", f"invalid file name in the manifest (must be <name>{SUFFIX})"), None
    path = ckpt / fname
    entry = _entry(raw_entry)
    expected = entry.bytes if entry is not None else None
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
    if entry is None:
        return FileCheck(fname, "mismatch", "manifest entry is malformed; cannot verify", None, size), None
    if size != entry.bytes:
        return FileCheck(fname, "mismatch", f"size {size} bytes, manifest says {entry.bytes} (truncated or "
                                            "extended)", entry.bytes, size), None
    if digest != entry.sha256:
        return FileCheck(fname, "mismatch", f"sha256 {digest[:12]}… differs from the manifest's "
                                            f"{entry.sha256[:12]}…", entry.bytes, size), None
    return FileCheck(fname, "ok", "", entry.bytes, size), blob


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
