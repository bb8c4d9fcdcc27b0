"""The manifest of a checkpoint (SPEC C-1): one pydantic model, used by the writer (it validates what it writes),
the loader (it returns the model) and ``esper inspect-checkpoint`` (it reads the model's fields).

A manifest is the envelope this package adds (``schema_version``, ``files`` with a sha256 and size per file,
the ``tensors`` summary, and ``manifest_sha256`` sealing the rest; each file's entry names its digest's
algorithm: BLAKE3 for files written now, sha256 for older ones) around the payload its caller gives. The
payload fields a training checkpoint carries are declared here, in the order they are written; every one is
optional, because the store is generic (the bench and the tests write other payloads, kept as extra fields).
Format v1: checkpoints written by any earlier Esper (sha256 entries) still verify; an Esper older than the
named-algorithm entries refuses a BLAKE3 entry as malformed rather than misreading it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esper.core.checkpoint.payload import (
    RUN_ID,
    SHA256,
    TRAINING_KEYS,
    AccumulationRecord,
    ComputeRecord,
    ControllerState,
    DataRecord,
    EmaRecord,
    EmergencyRecord,
    EpochStatsRecord,
    MetricsRow,
    OptimizerRecord,
    PrecisionRecord,
    SeedRecord,
    TensorSummary,
    TrainerStateName,
)
from esper.core.io import bounded

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
STRUCTURAL_KEYS = ("schema_version", "files", "tensors", "manifest_sha256")
MAX_MANIFEST_BYTES = 64 << 20
MAX_CONFIG_TOML = 1 << 20
_ENTRY_SHAPE = '{"algorithm": "blake3"|"sha256", "digest": <64 hex>, "bytes": <int >= 0>}'


class FileEntry(BaseModel):
    """Integrity record of one tensor file: ``{"algorithm": "blake3", "digest": <64 hex>, "bytes": n}``, or the
    form written before the digest was named, ``{"sha256": <64 hex>, "bytes": n}`` (still read: sha256)."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    algorithm: Literal["blake3", "sha256"] | None = None
    digest: str | None = Field(None, pattern=SHA256)  # both algorithms give 32 bytes: 64 hex digits
    sha256: str | None = Field(None, pattern=SHA256)
    bytes: int = Field(ge=0, le=2**62)

    @model_validator(mode="after")
    def _one_form(self) -> FileEntry:
        if (self.sha256 is None) == (self.digest is None) or (self.digest is None) != (self.algorithm is None):
            raise ValueError("give either 'algorithm' and 'digest' or (older checkpoints) 'sha256'")
        return self

    @property
    def algo(self) -> str:
        return self.algorithm or "sha256"

    @property
    def hexdigest(self) -> str:
        return self.digest if self.digest is not None else str(self.sha256)


class Manifest(BaseModel):
    """``manifest.json`` of one checkpoint (schema v1). Every payload field is typed (payload.py): a manifest
    whose fields have the wrong type, range or stage name fails validation, and so fails verification."""

    model_config = ConfigDict(strict=True, extra="allow", frozen=True)

    schema_version: int
    # --- payload of a training checkpoint (see tolaria.components for which part writes which key)
    run_id: str | None = Field(None, pattern=RUN_ID)
    reason: str | None = Field(None, max_length=256)
    epoch: int | None = Field(None, ge=0)  # epochs completed
    step_in_epoch: int | None = Field(None, ge=0)  # steps done in the next epoch (a mid-epoch stop)
    global_step: int | None = Field(None, ge=0)
    saved_at: str | None = None
    trainer_state: TrainerStateName | None = None  # type: ignore[valid-type]
    emergency: EmergencyRecord | None = None
    seeds: list[SeedRecord] | None = None
    controller: ControllerState | None = None
    metrics: dict[str, Any] | None = None
    history: list[MetricsRow] | None = None
    epoch_stats: EpochStatsRecord | None = None
    data: DataRecord | None = None  # batches skipped on replays (H-6)
    precision: PrecisionRecord | None = None  # the fp16 loss scaler
    compute: ComputeRecord | None = None  # FLOPs and training seconds so far
    accumulation: AccumulationRecord | None = None  # inside a gradient-accumulation window (absent: never)
    ema: EmaRecord | None = None  # the weights' moving average (null: the run has none)
    rollbacks: list[dict[str, Any]] | None = None
    commands: dict[str, int] | None = None
    optimizer: OptimizerRecord | None = None
    config_toml: str | None = Field(None, max_length=MAX_CONFIG_TOML)
    config_hash: str | None = Field(None, pattern=SHA256)
    versions: dict[str, str] | None = None
    # --- envelope
    files: dict[str, FileEntry] = Field(min_length=1)
    tensors: dict[str, TensorSummary]
    manifest_sha256: str

    @field_validator("schema_version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        if type(v) is not int or v != SCHEMA_VERSION:
            raise ValueError(f"schema_version {v!r} is not supported (this Esper reads {SCHEMA_VERSION})")
        return v

    @model_validator(mode="after")
    def _same_files(self) -> Manifest:
        if set(self.tensors) != set(self.files):
            raise ValueError(f"'tensors' lists {sorted(self.tensors)} but 'files' lists {sorted(self.files)}")
        return self

    def payload(self) -> dict[str, Any]:
        """The caller's payload: every field present in the file except the envelope."""
        return self.model_dump(mode="json", exclude=set(STRUCTURAL_KEYS), exclude_unset=True)

    def training_problems(self) -> list[str]:
        """What keeps this manifest from being a resumable training checkpoint (the keys it lacks)."""
        missing = [k for k in TRAINING_KEYS if k not in self.model_fields_set]
        nulls = [k for k in TRAINING_KEYS if k in self.model_fields_set and getattr(self, k) is None
                 and k not in ("controller", "epoch_stats")]  # no controller without slots; no partial epoch
        out = [f"missing key '{k}' (not a training checkpoint)" for k in missing]
        out += [f"'{k}' is null" for k in nulls]
        if self.controller is not None and self.run_id is not None and self.controller.run_id != self.run_id:
            out.append(f"'controller.run_id' is {self.controller.run_id!r}, the manifest's run_id is {self.run_id!r}")
        return out

    @classmethod
    def payload_fields(cls) -> list[str]:
        return [name for name in cls.model_fields if name not in STRUCTURAL_KEYS]


def manifest_digest(doc: Mapping[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON without ``manifest_sha256``: a manifest cannot hash its own bytes,
    but an edit or flipped byte that still parses must not pass verification. ValueError for NaN/Infinity."""
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode(payload: Mapping[str, Any], files: Mapping[str, Mapping[str, Any]], tensors: Mapping[str, Any], *,
           checked: bool = False) -> bytes:
    """The manifest file for ``payload`` around tensor files ``files`` (name -> its ``FileEntry`` fields, the
    digest taken while the file was written) summarised by ``tensors``. ValueError when the payload sets an
    envelope key, is not strict JSON or fails the schema. ``checked``: the same payload and summary were
    already encoded (with placeholder entries, before any file was written), so only the entries are
    validated now."""
    clash = sorted(set(payload) & set(STRUCTURAL_KEYS))
    if clash:
        raise ValueError(f"payload must not set structural manifest keys {clash}")
    doc: dict[str, Any] = {"schema_version": SCHEMA_VERSION, **payload}
    doc["files"] = {f: dict(entry) for f, entry in files.items()}
    doc["tensors"] = dict(tensors)
    try:
        # strict JSON so any reader (jq, other languages) can parse it
        doc["manifest_sha256"] = manifest_digest(doc)
        text = json.dumps(doc, indent=2, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint payload is not strict JSON: {exc}") from exc
    try:
        if checked:
            for entry in doc["files"].values():
                FileEntry.model_validate(entry)
        else:
            Manifest.model_validate_json(text)  # never write what the reader would refuse
    except ValidationError as exc:
        raise ValueError(f"checkpoint payload does not fit the manifest schema: {'; '.join(_describe(exc))}") from exc
    return (text + "\n").encode()


def validate(doc: dict[str, Any]) -> tuple[Manifest | None, list[str]]:
    """The model of a parsed manifest and every problem found (schema and seal), one message each."""
    problems: list[str] = []
    manifest: Manifest | None = None
    try:
        # JSON mode: the models read exactly what a JSON reader sees (lists where tuples live, ints as floats)
        manifest = Manifest.model_validate_json(json.dumps(doc, allow_nan=False))
    except ValidationError as exc:
        problems = _describe(exc)
    except ValueError as exc:  # NaN/Infinity literals: never written by encode
        problems = [f"not strict JSON: {exc}"]
    if "manifest_sha256" in doc:
        try:
            sealed = doc["manifest_sha256"] == manifest_digest(doc)
        except ValueError as exc:  # NaN/Infinity literals: never written by encode
            problems.append(f"not strict JSON: {exc}")
        else:
            if not sealed:
                problems.append("content does not match its manifest_sha256 (edited or corrupted)")
    return manifest, problems  # a model with seal problems is still shown by inspect, for triage


def _describe(exc: ValidationError) -> list[str]:
    out: list[str] = []
    for err in exc.errors():
        loc = err["loc"]
        head = str(loc[0]) if loc else ""
        if err["type"] == "missing" and len(loc) == 1:
            msg = f"missing key '{head}'"
        elif head == "files":
            msg = (f"'files.{loc[1]}' must be {_ENTRY_SHAPE}" if len(loc) > 1 else
                   "'files' must be a non-empty object of file name -> {sha256, bytes}")
        elif head == "tensors" and len(loc) <= 2:
            msg = f"'tensors.{loc[1]}' must be an object" if len(loc) > 1 else "'tensors' must be an object"
        elif err["type"] == "value_error" and len(loc) <= 1:
            msg = str(err["ctx"]["error"])
        else:
            where = ".".join(str(p) for p in loc)
            detail = str(err["ctx"]["error"]) if err["type"] == "value_error" else err["msg"]
            msg = f"'{where}': {bounded.clip(detail, 200)}"
        if msg not in out:
            out.append(msg)
    return out
