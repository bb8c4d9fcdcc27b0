"""Typed errors of the Tamiyo controller."""

from __future__ import annotations

from esper.core.errors import EsperError, ExitCode


class TamiyoError(EsperError):
    """Base of every controller failure (a misuse of the controller API is also one)."""


class ObservationError(TamiyoError):
    """A broken observation: a missing or non-finite metric, an unknown stage or slot, a missing blueprint."""


class ControllerStateError(TamiyoError):
    """Persisted controller state could not be serialised or restored; never continue on stale state."""

    exit_code = ExitCode.CHECKPOINT


class FieldReportError(TamiyoError):
    """A field report refused at write (no ``issued_at``, conflicting duplicate id) or an unusable log."""


class FieldReportLogMissing(FieldReportError):
    """The run directory holds no ``field_reports.jsonl``."""

    exit_code = ExitCode.USAGE


class FieldReportLogUnreadable(FieldReportError):
    """``field_reports.jsonl`` exists but cannot be read: no permission, not a regular file (a FIFO, a directory)."""

    exit_code = ExitCode.USAGE
