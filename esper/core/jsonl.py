"""JSON Lines files (``events.jsonl``, ``metrics.jsonl``, ``field_reports.jsonl``): one way to append, one way
to read (SPEC O-3).

A writer killed mid-line leaves a torn last line. Appending ends such a line first, so every later record
starts on a line of its own; reading skips only the lines that are not whole JSON objects, reports each one
(number, why, whether it was the torn tail) and keeps every later line. What a record must contain beyond
"a JSON object" is the caller's business (the event schema, a field report's checksum).

No torch here: the controller worker process imports telemetry, which imports this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from esper.core.durable import fsync_dir

SkipKind = Literal["blank", "not_utf8", "not_json", "not_object"]


@dataclass(frozen=True)
class Line:
    """A record read back: its 1-based line number and the JSON object on it."""

    number: int
    record: dict[str, Any]


@dataclass(frozen=True)
class Skipped:
    """A line the reader skipped. ``torn``: it is the last line and has no newline (a crash mid-write)."""

    number: int
    kind: SkipKind
    detail: str
    torn: bool = False

    def where(self) -> str:
        """``line N`` (with a note when it is the torn tail), for messages."""
        return f"line {self.number}" + (" (last, no newline: torn write?)" if self.torn else "")


def open_append(path: Path) -> IO[str]:
    """Open ``path`` for appending UTF-8 text; a torn last line is ended first so new records stay whole."""
    fh = open(path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - the caller owns the handle
    if fh.tell() > 0:
        with open(path, "rb") as raw:
            raw.seek(-1, os.SEEK_END)
            if raw.read(1) != b"\n":
                fh.write("\n")
                fh.flush()
    return fh


def append(path: Path, lines: Iterable[str], *, durable: bool) -> None:
    """Append encoded records (one JSON text each, without the newline). ``durable``: flushed and fsynced
    before returning, and the directory entry too when this call created the file."""
    created = not path.exists()
    with open_append(path) as fh:
        fh.write("".join(line + "\n" for line in lines))
        fh.flush()
        if durable:
            os.fsync(fh.fileno())
    if durable and created:
        fsync_dir(path.parent)


def parse(data: bytes) -> tuple[list[Line], list[Skipped]]:
    """Split file contents into records and skipped lines, in file order."""
    raw_lines = data.split(b"\n")
    torn_tail = raw_lines[-1] != b""
    if not torn_tail:
        raw_lines.pop()  # the empty string after the final newline is not a line
    records: list[Line] = []
    skipped: list[Skipped] = []
    last = len(raw_lines)
    for number, raw in enumerate(raw_lines, start=1):
        torn = torn_tail and number == last
        if not raw.strip():
            skipped.append(Skipped(number, "blank", "blank line", torn))
            continue
        try:
            obj = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            skipped.append(Skipped(number, "not_utf8", f"not UTF-8: {exc}", torn))
            continue
        except json.JSONDecodeError as exc:
            skipped.append(Skipped(number, "not_json", f"not valid JSON: {exc.msg} at column {exc.colno}", torn))
            continue
        if not isinstance(obj, dict):
            skipped.append(Skipped(number, "not_object", "not a JSON object", torn))
            continue
        records.append(Line(number, obj))
    return records, skipped


def read(path: Path) -> tuple[list[Line], list[Skipped]]:
    """Read a JSONL file (OSError when it cannot be read); see :func:`parse`."""
    return parse(path.read_bytes())

