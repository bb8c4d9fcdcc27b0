"""The one telemetry emitter (SPEC §7 O-1..O-4, §6 E-4) and a tolerant ``events.jsonl`` reader.

Records are one JSON object a line. INFO/WARNING/ERROR are batched; CRITICAL bypasses the batch and is on disk
(written, flushed, fsynced) before ``emit`` returns, so it precedes the action it announces. INFO/WARNING past
the per-second rate limit are dropped, counted and reported in a ``telemetry.dropped`` record; ERROR and
CRITICAL are never dropped. A failed write keeps its records in a deferral queue that is never cleared unsent.

This module must not import torch: the controller worker uses it too.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum, StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from esper.core.config import TelemetryConfig
from esper.core.errors import EsperError
from esper.core.io import jsonl

SOURCES: frozenset[str] = frozenset({"tolaria", "kasmina", "tamiyo", "cli", "telemetry"})
REQUIRED_FIELDS: tuple[str, ...] = (
    "seq", "utc", "monotonic_ms", "run_id", "epoch", "step", "source", "event", "level", "attributes",
)
_EVENT_NAME = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")
_RATE_WINDOW_S = 1.0


class Level(StrEnum):
    """Event severity (O-1)."""

    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"
    CRITICAL = "CRITICAL"


_RATE_LIMITED = frozenset({Level.INFO, Level.WARNING})


class TelemetryError(EsperError):
    """Telemetry was misused (bad source, level, event name or attribute) or its file cannot be used."""


class TelemetryWriteError(TelemetryError):
    """Non-critical records could not be written after retries; they stay queued for the next write."""


class TelemetryDeliveryError(TelemetryError):
    """A CRITICAL record could not be made durable after retries; it stays queued. The caller escalates."""


class Sink(Protocol):
    """What the emitter writes to: a text file opened for append (tests inject failing ones)."""

    def write(self, text: str, /) -> int: ...
    def flush(self) -> None: ...
    def fileno(self) -> int: ...
    def close(self) -> None: ...


def _json_safe(value: Any, where: str) -> Any:
    """Return ``value`` as plain JSON data; non-finite floats become "nan"/"inf"/"-inf" (O-1)."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, Enum):
        return _json_safe(value.value, where)
    if isinstance(value, numbers.Integral):  # int and numpy integer scalars
        return int(value)
    if isinstance(value, numbers.Real):  # float and numpy float scalars
        f = float(value)
        if math.isnan(f):
            return "nan"
        if math.isinf(f):
            return "inf" if f > 0 else "-inf"
        return f
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TelemetryError(f"attribute {where}: key {k!r} is not a string")
            out[k] = _json_safe(v, f"{where}.{k}")
        return out
    if isinstance(value, list | tuple):
        return [_json_safe(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TelemetryError(
        f"attribute {where}: {type(value).__name__} is not JSON-safe (convert it to str/int/float/list/dict)"
    )


def _parse_level(level: Level | str) -> Level:
    if isinstance(level, Level):
        return level
    try:
        return Level(str(level).upper())
    except ValueError:
        valid = ", ".join(m.value for m in Level)
        raise TelemetryError(f"unknown level {level!r}; expected one of {valid}") from None


def _zero_counters() -> dict[str, Any]:
    return {
        "emitted": {lvl.value: 0 for lvl in Level},
        "dropped": 0,
        "deferred": 0,
        "retries": 0,
        "batches": 0,
        "write_errors": 0,
    }


@dataclass
class _Line:
    text: str
    critical: bool


class Emitter:
    """The one telemetry emitter of a run (Tolaria arch 5); thread-safe.

    ``path`` None keeps records in memory only (``records``), for tests and benches. ``opener`` opens the
    file for append (default: UTF-8 text); it is called again to re-open after a failed write. ``clock``
    (seconds, monotonic) drives ``monotonic_ms`` and the rate-limit window. ``hold``: keep every record in
    memory, the file unopened, until :meth:`release` (a resume builds and restores before it writes anything)
    or :meth:`discard`. ``first_seq``: the ``seq`` of the first record (a resumed run continues its file's).
    """

    def __init__(
        self,
        path: Path | None,
        run_id: str,
        cfg: TelemetryConfig,
        *,
        opener: Callable[[Path], Sink] | None = None,
        clock: Callable[[], float] = time.monotonic,
        hold: bool = False,
        first_seq: int = 1,
    ) -> None:
        if not run_id:
            raise TelemetryError("run_id must be a non-empty string")
        self.path = path
        self.run_id = run_id
        self._cfg = cfg
        self._opener = opener or jsonl.open_append
        self._clock = clock
        # Re-entrant: a subscriber may emit from inside its callback.
        self._lock = threading.RLock()
        self._subscribers: list[Callable[[dict[str, Any]], None]] = []
        self._epoch: int | None = None
        self._step: int | None = None
        self._seq = first_seq - 1
        self._held = hold and path is not None
        self._pending: list[_Line] = []
        self._deferred: list[_Line] = []
        self._fh: Sink | None = None
        self._closed = False
        self._closed_record_made = False
        self._lifetime = _zero_counters()
        self._window = _zero_counters()
        self._rate_start: float | None = None
        self._rate_count = 0
        self._drops: Counter[str] = Counter()
        self.records: list[dict[str, Any]] = []  # filled only when path is None
        if path is not None and not self._held:
            self._open()

    def _open(self) -> None:
        assert self.path is not None
        try:
            self._fh = self._opener(self.path)
        except OSError as e:
            raise TelemetryError(f"cannot open telemetry file {self.path}: {e.strerror or e}") from e

    def release(self) -> None:
        """Open the file and write every held record, durably (TelemetryDeliveryError when it cannot be)."""
        with self._lock:
            if not self._held:
                return
            self._held = False
            try:
                self._open()
            except TelemetryError as exc:
                raise TelemetryDeliveryError(str(exc)) from exc.__cause__
            self._write(durable=True)

    def discard(self) -> None:
        """Drop the held records and close without writing (the run never started: nothing may be left)."""
        with self._lock:
            self._pending.clear()
            self._deferred.clear()
            self._closed = True

    # -- public API ---------------------------------------------------------------------------------------

    def set_context(self, *, epoch: int | None = None, step: int | None = None) -> None:
        """Set the epoch/step stamped on later records; an argument left as None is unchanged."""
        for name, v in (("epoch", epoch), ("step", step)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise TelemetryError(f"{name} must be a non-negative int, got {v!r}")
        with self._lock:
            if epoch is not None:
                self._epoch = epoch
            if step is not None:
                self._step = step

    def emit(
        self, source: str, event: str, level: Level | str = Level.INFO, **attributes: Any
    ) -> dict[str, Any] | None:
        """Record one event and return it (None when rate-limited away; the drop is counted and reported).

        Raises TelemetryDeliveryError when a CRITICAL record cannot be made durable (it stays queued), and
        TelemetryWriteError when a full batch cannot be written (it stays queued).
        """
        lvl = _parse_level(level)
        if source not in SOURCES:
            raise TelemetryError(f"unknown source {source!r}; expected one of {', '.join(sorted(SOURCES))}")
        if not isinstance(event, str) or not _EVENT_NAME.match(event):
            raise TelemetryError(f"bad event name {event!r}; use dotted words like 'seed.transition'")
        attrs = _json_safe(attributes, "attributes")
        with self._lock:
            if self._closed:
                raise TelemetryError(f"emit({event!r}) after the emitter was closed")
            now = self._clock()
            self._roll_rate_window(now)
            if lvl in _RATE_LIMITED:
                if self._rate_count >= self._cfg.rate_limit_per_s:
                    self._drops[event] += 1
                    self._count("dropped")
                    return None
                self._rate_count += 1
            record = self._make(source, event, lvl, attrs, now, notify=False)
            failure: TelemetryError | None = None
            try:
                if lvl is Level.CRITICAL:
                    self._write(durable=True)
                elif len(self._pending) >= self._cfg.batch_size:
                    self._write(durable=False)
            except (TelemetryWriteError, TelemetryDeliveryError) as e:
                # The record is queued, so it is kept: subscribers still see it before the caller escalates.
                failure = e
            self._notify(record)
            if failure is not None:
                raise failure
            return record

    def subscribe(self, fn: Callable[[dict[str, Any]], None]) -> None:
        """Call ``fn`` with every record that is kept (not rate-limited away), in ``seq`` order."""
        with self._lock:
            self._subscribers.append(fn)

    def flush(self) -> None:
        """Report pending drops, then write and flush the deferred queue and the pending batch."""
        with self._lock:
            self._report_drops()
            self._write(durable=False)

    def close(self) -> None:
        """Flush, write a durable ``telemetry.closed`` record with the stats so far, close the file.

        Idempotent. If the final write fails the emitter stays open (records queued) and the error is raised.
        """
        with self._lock:
            if self._closed:
                return
            self._report_drops()
            if not self._closed_record_made:  # a retried close must not write a second closing record
                self._make("telemetry", "telemetry.closed", Level.INFO, {"stats": self._stats_locked()},
                           self._clock())
                self._closed_record_made = True
            self._write(durable=True)
            fh, self._fh = self._fh, None
            self._closed = True
            if fh is not None:
                try:
                    fh.close()
                except OSError as e:
                    raise TelemetryError(f"closing telemetry file {self.path} failed: {e}") from e

    @property
    def stats(self) -> dict[str, Any]:
        """Lifetime counters plus the current queue sizes (``queued`` = deferred, ``pending`` = batched)."""
        with self._lock:
            return self._stats_locked()

    def reset_window(self) -> dict[str, Any]:
        """Return the counters since the last call (O-4) and start a new window; lifetime totals are kept."""
        with self._lock:
            window = self._window
            self._window = _zero_counters()
            return window

    def __enter__(self) -> Emitter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- internals (lock held) ----------------------------------------------------------------------------

    def _count(self, key: str, level: Level | None = None, n: int = 1) -> None:
        for counters in (self._lifetime, self._window):
            if level is None:
                counters[key] += n
            else:
                counters[key][level.value] += n

    def _stats_locked(self) -> dict[str, Any]:
        out = json.loads(json.dumps(self._lifetime))  # deep copy of plain data
        out["queued"] = len(self._deferred)
        out["pending"] = len(self._pending)
        return out

    def _make(
        self, source: str, event: str, lvl: Level, attrs: dict[str, Any], now: float, *, notify: bool = True
    ) -> dict[str, Any]:
        """Build a kept record, queue it for writing, count it and (``notify``) hand it to subscribers."""
        self._seq += 1
        record: dict[str, Any] = {
            "seq": self._seq,
            "utc": datetime.now(UTC).isoformat(timespec="microseconds"),
            "monotonic_ms": round(now * 1000.0, 3),
            "run_id": self.run_id,
            "epoch": self._epoch,
            "step": self._step,
            "source": source,
            "event": event,
            "level": lvl.value,
            "attributes": attrs,
        }
        # allow_nan=False: attributes were made JSON-safe, so a non-finite here is a bug, not data.
        line = json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n"
        self._count("emitted", lvl)
        if self.path is None:
            self.records.append(record)
        else:
            self._pending.append(_Line(line, lvl is Level.CRITICAL))
        if notify:
            self._notify(record)
        return record

    def _notify(self, record: dict[str, Any]) -> None:
        for fn in self._subscribers:
            fn(record)

    def _roll_rate_window(self, now: float) -> None:
        if self._rate_start is None or now - self._rate_start >= _RATE_WINDOW_S:
            self._report_drops()
            self._rate_start = now
            self._rate_count = 0

    def _report_drops(self) -> None:
        """Turn counted drops into one WARNING record so drops are never silent (O-2)."""
        if not self._drops:
            return
        dropped = dict(sorted(self._drops.items()))
        self._drops.clear()
        self._make("telemetry", "telemetry.dropped", Level.WARNING,
                   {"dropped": dropped, "total": sum(dropped.values())}, self._clock())

    def _write(self, *, durable: bool) -> None:
        """Write deferred + pending lines in order; retry (re-open); keep them queued on failure."""
        if self.path is None:
            return
        if self._held:
            if durable:  # a CRITICAL must be on disk before its action, and the file is not open yet: a bug
                raise TelemetryError("a CRITICAL event was emitted before the run directory was opened")
            return
        lines = self._deferred + self._pending
        if not lines:
            return
        newly_deferred = len(self._pending)
        self._deferred, self._pending = lines, []
        text = "".join(line.text for line in lines)
        attempts = 1 + self._cfg.critical_retries
        last: OSError | None = None
        for attempt in range(attempts):
            if attempt:
                self._count("retries")
            start: int | None = None
            try:
                if self._fh is None:
                    self._fh = self._opener(self.path)
                start = jsonl.size_of(self._fh)
                self._fh.write(text)
                self._fh.flush()
                if durable:
                    os.fsync(self._fh.fileno())
            except OSError as e:
                if last is None:  # the batch's own lines join the deferral queue once, on the first failure
                    self._count("deferred", n=newly_deferred)
                last = e
                self._discard_handle()
                self._cut_torn(start)
                continue
            self._deferred = []
            self._count("batches")
            return
        self._count("write_errors")
        critical = sum(line.critical for line in lines)
        msg = (f"could not write {len(lines)} telemetry record(s) to {self.path} "
               f"after {attempts} attempt(s): {last}; they stay queued")
        if critical:
            raise TelemetryDeliveryError(f"{critical} CRITICAL record(s) not durable: {msg}") from last
        raise TelemetryWriteError(msg) from last

    def _cut_torn(self, start: int | None) -> None:
        """A write that failed part-way (a full disk, the file-size limit) leaves a torn record: cut the file back
        to where the batch began, so the log stays whole records and the retry writes the batch once. Where even
        that fails, the next open ends the torn line (readers skip one line)."""
        if start is not None and self.path is not None and not jsonl.cut_back(self.path, start):
            self._count("write_errors")

    def _discard_handle(self) -> None:
        """Drop a handle that failed so the next attempt re-opens the file."""
        fh, self._fh = self._fh, None
        if fh is None:
            return
        try:
            fh.close()
        except OSError:
            # The handle already failed a write and is being replaced; its close error adds nothing.
            self._count("write_errors")

