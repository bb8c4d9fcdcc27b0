"""T-12 field reports: outcome classification, the append-only checksummed log and its tolerant reader."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from esper.core.io import jsonl
from esper.core.io.confine import UnsafePath
from esper.core.tamiyo._util import describe, parse_utc
from esper.core.tamiyo.errors import FieldReportError, FieldReportLogMissing, FieldReportLogUnreadable
from esper.core.tamiyo.state import EpochMetrics

FILENAME = "field_reports.jsonl"


class Outcome(StrEnum):
    SUCCESS = "SUCCESS"
    NEUTRAL = "NEUTRAL"
    REGRESSION = "REGRESSION"
    ABORTED = "ABORTED"


class FieldReport(BaseModel):
    """What became of one applied command, judged over its observation window."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)

    report_id: str = Field(min_length=1)
    run_id: str = Field(min_length=1)
    command_id: str = Field(min_length=1)
    kind: Literal["germinate", "cull", "fossilize"]
    slot: str = Field(min_length=1)
    blueprint: str | None
    outcome: Outcome = Field(strict=False)  # JSON carries the value string
    outcome_reason: str = Field(min_length=1)
    applied_epoch: int = Field(ge=0)
    window_epochs: int = Field(ge=1)
    metrics_before: EpochMetrics
    metrics_after: EpochMetrics
    issued_at: str
    # filed when the run ended before the window did: judged over the epochs it had (metrics_after's epoch)
    short_window: bool = False

    @field_validator("issued_at")
    @classmethod
    def _utc(cls, v: str) -> str:
        parse_utc(v)
        return v

    def issued(self) -> datetime:
        return parse_utc(self.issued_at)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> FieldReport:
        """Validate a report body; a missing or non-UTC ``issued_at`` is a FieldReportError."""
        if not isinstance(data, dict):
            raise FieldReportError(f"a field report must be a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate_json(json.dumps(data, allow_nan=False))
        except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
            detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            raise FieldReportError(f"invalid field report: {detail}") from exc


def report_id_for(command_id: str, *, short: bool = False) -> str:
    """One report per command, so the command id makes the report id unique within the run; a short-window
    report (the run ended first) has its own id, so a resumed run that completes the window files the full one."""
    return f"rpt-{command_id}" + ("-short" if short else "")


def relative_change(before: float, after: float) -> float:
    """(after - before) / |before|; 0 when before is 0 (no scale to judge against)."""
    return 0.0 if before == 0.0 else (after - before) / abs(before)


def classify(before: EpochMetrics, after: EpochMetrics, min_delta: float, primary: str,
             direction: str) -> tuple[Outcome, str]:
    """SUCCESS when val loss fell by at least ``min_delta`` (relative) or the task's primary metric improved by
    it (absolute, in its ``direction``) and neither got worse by that much; REGRESSION for the mirror image;
    NEUTRAL for small or mixed changes. A primary metric of ``val_loss`` is judged by the loss alone."""
    loss = relative_change(before.val_loss, after.val_loss)
    better = loss <= -min_delta
    worse = loss >= min_delta
    detail = f"val loss {before.val_loss:.4g} -> {after.val_loss:.4g} ({loss:+.2%}), "
    if primary != "val_loss":
        b, a = before.metric(primary), after.metric(primary)
        gain = (a - b) if direction == "max" else (b - a)
        better, worse = better or gain >= min_delta, worse or gain <= -min_delta
        detail += f"{primary} {b:.4f} -> {a:.4f} ({a - b:+.4f}), "
    detail += f"epochs {before.epoch} -> {after.epoch}, threshold {min_delta:g}"
    if better and not worse:
        return Outcome.SUCCESS, detail
    if worse and not better:
        return Outcome.REGRESSION, detail
    return Outcome.NEUTRAL, ("mixed: " if better and worse else "") + detail


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes a checksum covers: sorted keys, no whitespace, ASCII."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode("ascii")


def checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


ProblemKind = Literal["truncated", "corrupt", "checksum", "invalid", "duplicate"]


@dataclass(frozen=True)
class ReadProblem:
    """A record the reader skipped: 1-based line number, what was wrong, and the report id when known."""

    line: int
    kind: ProblemKind
    detail: str
    report_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"line": self.line, "kind": self.kind, "detail": self.detail, "report_id": self.report_id}


def _check_line(line: jsonl.Line) -> tuple[dict[str, Any] | None, ReadProblem | None]:
    record = line.record
    if set(record) != {"body", "sha256"} or not isinstance(record["body"], dict):
        return None, ReadProblem(line.number, "corrupt", "not a {body, sha256} record")
    body = record["body"]
    rid = body.get("report_id") if isinstance(body.get("report_id"), str) else None
    try:
        expected = checksum(body)
    except (TypeError, ValueError) as exc:
        return None, ReadProblem(line.number, "corrupt", f"body not canonical JSON: {exc}", rid)
    if record["sha256"] != expected:
        return None, ReadProblem(line.number, "checksum", "sha256 does not match the record body", rid)
    return body, None


def _skipped(s: jsonl.Skipped) -> ReadProblem:
    return ReadProblem(s.number, "truncated" if s.torn else "corrupt", f"not a JSON record: {s.detail}")


def read_reports(path: Path) -> tuple[list[FieldReport], list[ReadProblem]]:
    """Every intact report in file order, plus each skipped record. A bad record never hides later ones;
    a record without ``issued_at`` or repeating an earlier report id is skipped and reported."""
    if not os.path.lexists(path):
        raise FieldReportLogMissing(f"no field report log at {path}")
    try:
        lines, skipped = jsonl.read(path)  # only a regular file, opened without blocking (a FIFO is refused)
    except UnsafePath as exc:
        raise FieldReportLogUnreadable(f"{path}: cannot be read: {exc}") from None
    except OSError as exc:
        raise FieldReportLogUnreadable(f"{path}: cannot be read: {exc.strerror or exc}") from None
    problems = {s.number: _skipped(s) for s in skipped if s.kind != "blank"}
    reports: list[FieldReport] = []
    seen: dict[str, int] = {}
    for line in lines:
        body, problem = _check_line(line)
        if problem is not None:
            problems[line.number] = problem
            continue
        assert body is not None
        try:
            report = FieldReport.from_dict(body)
        except FieldReportError as exc:
            rid = body.get("report_id") if isinstance(body.get("report_id"), str) else None
            problems[line.number] = ReadProblem(line.number, "invalid", str(exc), rid)
            continue
        if report.report_id in seen:
            problems[line.number] = ReadProblem(line.number, "duplicate",
                                                f"report id already used on line {seen[report.report_id]}",
                                                report.report_id)
            continue
        seen[report.report_id] = line.number
        reports.append(report)
    return reports, [problems[n] for n in sorted(problems)]


def prune(reports: Iterable[FieldReport], max_age: timedelta, now: datetime) -> list[FieldReport]:
    """Reports issued within ``max_age`` of ``now`` (timezone-aware); age is judged on ``issued_at`` only."""
    if now.tzinfo is None:
        raise FieldReportError("prune needs a timezone-aware 'now'")
    if max_age < timedelta(0):
        raise FieldReportError(f"max_age must not be negative, got {max_age}")
    cutoff = now - max_age
    return [r for r in reports if r.issued() >= cutoff]


def _same_report(a: FieldReport, b: FieldReport) -> bool:
    """Equal apart from ``issued_at``: the same decision re-derived (an exact resume re-files its reports)."""
    return a.model_dump(exclude={"issued_at"}) == b.model_dump(exclude={"issued_at"})


class FieldReportLog:
    """Append-only ``field_reports.jsonl``: one ``{"body", "sha256"}`` record a line, flushed and fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._known: dict[str, FieldReport] = {}
        if path.exists():
            reports, _ = read_reports(path)
            self._known = {r.report_id: r for r in reports}

    def append(self, report: FieldReport | dict[str, Any]) -> bool:
        """Write one report durably. Returns False, writing nothing, when the identical report (bar
        ``issued_at``) is already in the log; a different report under a used id is a FieldReportError, and so
        is a record without ``issued_at``."""
        if isinstance(report, dict):
            if not report.get("issued_at"):
                raise FieldReportError(
                    f"field report {report.get('report_id')!r} has no issued_at; refusing to write it")
            report = FieldReport.from_dict(report)
        existing = self._known.get(report.report_id)
        if existing is not None:
            if _same_report(existing, report):
                return False
            raise FieldReportError(f"report id {report.report_id} is already used by a different report")
        body = report.to_dict()
        line = json.dumps({"body": body, "sha256": checksum(body)}, sort_keys=True, separators=(",", ":"))
        jsonl.append(self.path, [line], durable=True)  # durable: a report is filed once
        self._known[report.report_id] = report
        return True
