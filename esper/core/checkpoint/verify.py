"""Verified reads (SPEC C-3, S-2, S-3, P-3): every file's name, size, digest (the algorithm its manifest entry
names: BLAKE3, or sha256 for older checkpoints) and safetensors header and the manifest's schema and seal are
checked before a tensor is used; the tensors hold the very bytes that were hashed (one read straight into them,
hashed as it is read, nothing re-read between check and use).

Nothing here unpickles. A file that is not valid safetensors is *named* a pickle by its leading bytes, never
opened as one. Nothing here follows a symbolic link or reads anything but a regular file. A file's size is
checked against the manifest before a byte of it is read, and hashing streams in one pass over each file, so
verifying needs a few chunks of memory however large a forged file is; a load holds exactly the bytes the
manifest declares, the ones it hashed.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import torch

from esper.core.checkpoint import stream
from esper.core.checkpoint.locate import NAME_RE, SUFFIX, resolve_checkpoint
from esper.core.checkpoint.manifest import MANIFEST, MAX_MANIFEST_BYTES, FileEntry, Manifest, validate
from esper.core.checkpoint.payload import TRAINING_KEYS
from esper.core.config import from_toml_text
from esper.core.config.trust import Reference, references
from esper.core.errors import CheckpointError, ConfigError
from esper.core.io import bounded, confine

_PARALLEL_FILES = 2
Loaded = dict[str, torch.Tensor] | stream.FormatError  # a file's tensors, or why its header gives none

_CHUNK = 1 << 20

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

    ``manifest`` is the model when the manifest fits its schema (also when its seal is broken); ``document`` is
    the manifest as parsed, whatever its schema verdict (inspect shows it for triage, flagged as invalid).
    ``references`` are the code references and paths the checkpoint's config names (S-1): not damage, but what
    a resume would refuse unless the operator's own config names them too."""

    path: Path
    manifest: Manifest | None
    manifest_problems: list[str] = field(default_factory=list)
    files: list[FileCheck] = field(default_factory=list)
    document: dict[str, Any] | None = None
    references: list[Reference] = field(default_factory=list)

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
            "references": [r.to_dict() for r in self.references],
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


# keys only a training run writes (a store checkpoint, a bench one, may carry a run id, epoch, step, metrics,
# reason, optimizer)
_RUN_ONLY = frozenset(TRAINING_KEYS) - {"run_id", "reason", "epoch", "global_step", "metrics", "optimizer"}


def verify_checkpoint(path: Path) -> VerifyReport:
    """Check the manifest (JSON, schema, seal) and every file (name, size, digest, safetensors header, no
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
    for fname, loaded in data.items():
        if isinstance(loaded, stream.FormatError):
            raise CheckpointError(f"{ckpt / fname}: not loadable as safetensors: {loaded}")
        tensors[fname.removesuffix(SUFFIX)] = loaded
    missing = set(report.manifest.files) - set(data)
    if missing:  # pragma: no cover - report.ok guarantees every listed file was read
        raise CheckpointError(f"checkpoint {ckpt}: files not read: {sorted(missing)}")
    return LoadedCheckpoint(path=ckpt, manifest=report.manifest, tensors=tensors)


def _verify(ckpt: Path, *, keep_bytes: bool) -> tuple[VerifyReport, dict[str, Loaded]]:
    doc, problems = _read_manifest(ckpt / MANIFEST)
    manifest = None
    refs: list[Reference] = []
    if doc is not None:
        manifest, problems = validate(doc)
        if manifest is not None and manifest.model_fields_set & _RUN_ONLY:
            # a run's checkpoint (it carries what only the trainer writes): what resume needs is part of its
            # integrity, so --verify passes a checkpoint exactly when --resume could use it
            problems += [f"{MANIFEST}: {p}" for p in manifest.training_problems()]
        if manifest is not None and manifest.config_toml is not None:
            try:
                refs = references(from_toml_text(manifest.config_toml, source="config_toml"))
            except ConfigError as exc:
                problems.append(bounded.clip(str(exc), 400))
    report = VerifyReport(path=ckpt, manifest=manifest, manifest_problems=problems, document=doc, references=refs)
    data: dict[str, Loaded] = {}
    # the files the document lists, even when the rest of it fails its schema: each is still checked
    listed: dict[str, Any] = doc["files"] if doc is not None and isinstance(doc.get("files"), dict) else {}
    # two files at a time: a file's read (page-cache copy, first-touch faults) and its hash thread leave a core
    # idle that the next file's read fills; the report keeps the manifest's order
    with ThreadPoolExecutor(max_workers=_PARALLEL_FILES, thread_name_prefix="esper-verify") as pool:
        checks = list(pool.map(lambda item: _check_listed(ckpt, item[0], item[1], keep_bytes=keep_bytes),
                               listed.items()))
    for fname, (check, loaded) in zip(listed, checks, strict=True):
        report.files.append(check)
        if loaded is not None:
            data[fname] = loaded
    with os.scandir(ckpt) as entries:
        extra = sorted(e.name for e in entries if e.name != MANIFEST and e.name not in listed)
    for name in extra:
        report.files.append(_check_extra(ckpt / name))
    return report, data


def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        raw = confine.read_bytes(path, MAX_MANIFEST_BYTES)
    except FileNotFoundError:
        return None, ["missing"]
    except confine.UnsafePath as exc:
        detail = str(exc).removeprefix(f"{path} ")
        return None, [detail if "larger than" in detail else "not a regular file"]
    except OSError as exc:
        return None, [f"unreadable: {exc.strerror or exc}"]
    try:
        doc = bounded.loads_json(raw)
    except bounded.ParseError as exc:
        return None, [f"not valid JSON: {exc}" if not str(exc).startswith("not valid JSON") else str(exc)]
    if not isinstance(doc, dict):
        return None, [f"expected a JSON object, got {type(doc).__name__}"]
    return doc, []


def _entry(entry: Any) -> FileEntry | None:
    try:
        return FileEntry.model_validate(entry)
    except ValueError:  # pydantic's ValidationError
        return None


def _check_listed(ckpt: Path, fname: str, raw_entry: Any, *,
                  keep_bytes: bool) -> tuple[FileCheck, Loaded | None]:
    if not (fname.endswith(SUFFIX) and NAME_RE.match(fname)):
        return FileCheck(fname, "unsafe", f"invalid file name in the manifest (must be <name>{SUFFIX})"), None
    path = ckpt / fname
    entry = _entry(raw_entry)
    expected = entry.bytes if entry is not None else None
    try:
        fh = confine.open_regular(path)
    except FileNotFoundError:
        return FileCheck(fname, "missing", "listed in the manifest but absent", expected), None
    except confine.UnsafePath:
        return FileCheck(fname, "unsafe", "not a regular file", expected), None
    except OSError as exc:
        return FileCheck(fname, "missing", f"unreadable: {exc.strerror or exc}", expected), None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        head = fh.read(4)
        if entry is None or size != entry.bytes:
            # judged without reading the file: a forged size never makes Esper read (or hold) a forged file
            if head.startswith(_PICKLE_MAGIC) and _safetensors_problem(path) is not None:
                return FileCheck(fname, "unsafe", "is a pickle/torch.save archive, not safetensors; it is never "
                                                  "unpickled", expected, size), None
            if entry is None:
                return FileCheck(fname, "mismatch", "manifest entry is malformed; cannot verify", None, size), None
            return FileCheck(fname, "mismatch", f"size {size} bytes, manifest says {entry.bytes} (truncated or "
                                                "extended)", entry.bytes, size), None
        header_problem = _safetensors_problem(path)
        if header_problem is not None:
            if head.startswith(_PICKLE_MAGIC):
                return FileCheck(fname, "unsafe", "is a pickle/torch.save archive, not safetensors; it is never "
                                                  "unpickled", expected, size), None
            return FileCheck(fname, "corrupt", f"not a valid safetensors file: {header_problem}",
                             expected, size), None
        fh.seek(0)
        try:
            digest, loaded, read = _hash(fh, size, entry.algo, keep_bytes=keep_bytes)
        except OSError as exc:
            return FileCheck(fname, "missing", f"unreadable: {exc.strerror or exc}", expected, size), None
    if read != size:
        return FileCheck(fname, "mismatch", f"changed size while it was read ({read} bytes, {size} at the start)",
                         entry.bytes, size), None
    if digest != entry.hexdigest:
        return FileCheck(fname, "mismatch", f"{entry.algo} digest {digest[:12]}… differs from the manifest's "
                                            f"{entry.hexdigest[:12]}…", entry.bytes, size), None
    return FileCheck(fname, "ok", "", entry.bytes, size), loaded


def _hash(fh: Any, size: int, algorithm: str, *, keep_bytes: bool) -> tuple[str, Loaded | None, int]:
    """The digest of the file and what it held, in one pass. With ``keep_bytes`` its tensors (read from the very
    bytes hashed, at most ``size`` of them: the size the manifest declared and the file was found to have), or
    why its header gives none."""
    if keep_bytes:
        return stream.read_tensors(fh, size, algorithm)  # one byte more than size: it grew while read
    h = stream.hasher(algorithm)
    read = 0
    while chunk := fh.read(_CHUNK):
        h.update(chunk)
        read += len(chunk)
    return h.hexdigest(), None, read


def _check_extra(path: Path) -> FileCheck:
    try:
        st = confine.check_entry(path, kind="file")
    except (confine.UnsafePath, OSError):
        return FileCheck(path.name, "unsafe", "unexpected entry, not a regular file, not in the manifest")
    if _safetensors_problem(path) is not None and _looks_pickled(path):
        return FileCheck(path.name, "unsafe", "unexpected pickle/torch.save file not listed in the manifest; "
                                              "it is never unpickled", None, st.st_size)
    return FileCheck(path.name, "unexpected", "not listed in the manifest", None, st.st_size)


def _looks_pickled(path: Path) -> bool:
    """Name the problem by the file's leading bytes; asked only of files that are not valid safetensors
    (a valid header's length may itself start with 0x80)."""
    try:
        with confine.open_regular(path) as f:
            return f.read(4).startswith(_PICKLE_MAGIC)
    except (OSError, confine.UnsafePath):
        return False  # unreadable: reported as corrupt/unexpected by the caller, not as a pickle


def _safetensors_problem(path: Path) -> str | None:
    """Parse (only) the safetensors header with the library itself; None when it is well formed."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            f.keys()
    except safetensors.SafetensorError as exc:
        return bounded.clip(str(exc), 200)
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    return None
