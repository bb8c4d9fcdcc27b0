"""JSON Lines files (``events.jsonl``, ``metrics.jsonl``, ``field_reports.jsonl``): one way to append, one way
to read (SPEC O-3, S-2, S-4).

A writer killed mid-line leaves a torn last line. Appending ends such a line first, so every later record
starts on a line of its own; reading skips only the lines that are not whole JSON objects, reports each one
(number, why, whether it was the torn tail) and keeps every later line. What a record must contain beyond
"a JSON object" is the caller's business (the event schema, a field report's checksum).

Every file is outside input. Reading streams (memory is bounded by one line, however large the file), a line
longer than :data:`MAX_LINE_BYTES` is skipped without being held, and each record is parsed by the bounded
JSON parser (nesting, number size); invalid UTF-8 is a skipped record like any other. Neither reading nor
appending follows a symbolic link, and reading refuses anything but a regular file (a FIFO never blocks it).
Skip details never quote the line.

No torch here: the controller worker process imports telemetry, which imports this.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

from esper.core.io import bounded, confine
from esper.core.io.durable import fsync_dir

SkipKind = Literal["blank", "not_utf8", "not_json", "not_object", "too_long"]
# Far above any record Esper writes (a failure event with its traceback is a few KiB).
MAX_LINE_BYTES = 1 << 20
_CHUNK = 1 << 16
_TAIL_READ = 8 << 20


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
    """Open ``path`` for appending UTF-8 text (never through a symbolic link); a torn last line is ended first
    so new records stay whole."""
    # read-write so the last byte can be checked on the very descriptor that appends
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    fh = os.fdopen(fd, "a", encoding="utf-8", newline="\n")
    try:
        size = os.fstat(fd).st_size
        if size > 0 and os.pread(fd, 1, size - 1) != b"\n":
            fh.write("\n")
            fh.flush()
    except BaseException:
        fh.close()
        raise
    return fh


def size_of(fh: object) -> int | None:
    """The size of the file behind an open handle (None for a handle that is no file: a test's stand-in)."""
    fileno = getattr(fh, "fileno", None)
    if fileno is None:
        return None
    try:
        return os.fstat(fileno()).st_size
    except (OSError, ValueError):
        return None


def cut_back(path: Path, size: int) -> bool:
    """Truncate ``path`` (never through a link) back to ``size`` bytes when it grew past them: a batch whose
    write failed part-way leaves no torn record. False when the disk refused even that."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if os.fstat(fd).st_size > size:
            os.ftruncate(fd, size)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


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


def parse_line(number: int, raw: bytes, *, torn: bool = False) -> Line | Skipped:
    """One line's verdict (``raw`` without its newline)."""
    if not raw.strip():
        return Skipped(number, "blank", "blank line", torn)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Skipped(number, "not_utf8", f"not UTF-8 (byte {exc.start})", torn)
    try:
        obj = bounded.loads_json(text)
    except bounded.ParseError as exc:
        return Skipped(number, "not_json", str(exc), torn)
    if not isinstance(obj, dict):
        return Skipped(number, "not_object", "not a JSON object", torn)
    return Line(number, obj)


def iter_stream(fh: IO[bytes]) -> Iterator[Line | Skipped]:
    """Every line of a binary stream, in order, holding at most one line of :data:`MAX_LINE_BYTES`."""
    number = 0
    buf = bytearray()
    overflow = False  # the current line passed the bound: its bytes are dropped until its newline
    while True:
        chunk = fh.read(_CHUNK)
        if not chunk:
            break
        start = 0
        while True:
            nl = chunk.find(b"\n", start)
            piece = chunk[start:] if nl < 0 else chunk[start:nl]
            if not overflow:
                buf += piece
                if len(buf) > MAX_LINE_BYTES:
                    overflow, buf = True, bytearray()
            if nl < 0:
                break
            number += 1
            yield _verdict(number, buf, overflow, torn=False)
            buf, overflow, start = bytearray(), False, nl + 1
    if buf or overflow:
        number += 1
        yield _verdict(number, buf, overflow, torn=True)


def _verdict(number: int, buf: bytearray, overflow: bool, *, torn: bool) -> Line | Skipped:
    if overflow:
        return Skipped(number, "too_long", f"longer than {MAX_LINE_BYTES} bytes", torn)
    return parse_line(number, bytes(buf), torn=torn)


def parse(data: bytes) -> tuple[list[Line], list[Skipped]]:
    """Split file contents into records and skipped lines, in file order."""
    return _split(iter_stream(io.BytesIO(data)))


def iter_file(path: Path) -> Iterator[Line | Skipped]:
    """Stream a JSONL file (OSError when it cannot be opened; UnsafePath for a link or a non-regular file)."""
    with confine.open_regular(path) as fh:
        yield from iter_stream(fh)


def read(path: Path) -> tuple[list[Line], list[Skipped]]:
    """Read a JSONL file; see :func:`iter_file`."""
    return _split(iter_file(path))


def _split(items: Iterable[Line | Skipped]) -> tuple[list[Line], list[Skipped]]:
    records: list[Line] = []
    skipped: list[Skipped] = []
    for item in items:
        (records if isinstance(item, Line) else skipped).append(item)  # type: ignore[arg-type]
    return records, skipped


class Tail:
    """New records of a JSONL file that another process appends to (``esper emergency clear`` waiting for the
    run's answer; a live view): each :meth:`new` returns the whole lines written since the last call. A line
    still being written (no newline yet) waits for the next call; a line longer than the bound is skipped."""

    def __init__(self, path: Path, *, from_end: bool = False) -> None:
        """``from_end``: only what is appended from now on (the first line seen may be the end of one being
        written, and is then skipped as not JSON)."""
        self.path = path
        self.offset = 0
        self.number = 0
        if from_end:
            with contextlib.suppress(FileNotFoundError):  # no file yet: everything in it will be new
                self.offset = os.lstat(path).st_size

    def new(self) -> list[Line]:
        """Whole lines appended since the last call (at most a few MiB per call: call again for more)."""
        try:
            fh = confine.open_regular(self.path)
        except FileNotFoundError:
            return []
        out: list[Line] = []
        with fh:
            fh.seek(self.offset)
            data = fh.read(_TAIL_READ)
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) > MAX_LINE_BYTES:  # a line past the bound never becomes a record: step over it
                self.offset += len(data)
            return out
        for item in iter_stream(io.BytesIO(data[: end + 1])):
            self.number += 1
            if isinstance(item, Line):
                out.append(Line(self.number, item.record))
        self.offset += end + 1
        return out
