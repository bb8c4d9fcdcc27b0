"""Reading ``events.jsonl`` back: every record with the required fields, and each torn or garbled line reported
by its number (O-3), never a crash."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.core.io import jsonl
from esper.core.records.telemetry import REQUIRED_FIELDS, TelemetryError


@dataclass(frozen=True)
class ReadResult:
    """Records read from an events file and the problems found (``line N: ...``)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def read_events(path: Path) -> ReadResult:
    """Read ``events.jsonl``; torn or garbled lines are reported by line number, later lines kept (O-3)."""
    try:
        lines, skipped = jsonl.read(path)
    except OSError as e:
        raise TelemetryError(f"cannot read events file {path}: {e}") from e
    problems = {s.number: f"{s.where()}: {s.detail}" for s in skipped}
    records: list[dict[str, Any]] = []
    for line in lines:
        missing = [k for k in REQUIRED_FIELDS if k not in line.record]
        if missing:
            problems[line.number] = f"line {line.number}: missing field(s) {', '.join(missing)}"
        else:
            records.append(line.record)
    return ReadResult(records, [problems[n] for n in sorted(problems)])
