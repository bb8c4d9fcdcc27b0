"""Exit codes (SPEC §8) and the typed errors that map onto them. Defined once, used everywhere."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    CONFIG = 3
    CHECKPOINT = 4
    ILLEGAL = 5
    HALTED = 6
    EXPECTATION = 7
    BUSY = 8
    INCOMPLETE = 9  # a run ended without a summary: its writer was killed or crashed (`esper watch`)
    SIGINT = 130
    SIGPIPE = 141  # stdout's reader went away (`esper runs | head`), as a Unix tool killed by SIGPIPE reports
    SIGTERM = 143


class EsperError(Exception):
    """Base of Esper's typed errors; ``exit_code`` is what the CLI exits with, ``key`` the dotted config key (or
    option) the error is about, when there is one (the ``key`` of the ``--json`` error document)."""

    exit_code: ExitCode = ExitCode.INTERNAL

    def __init__(self, *args: object, key: str | None = None) -> None:
        super().__init__(*args)
        self.key = key


class UsageError(EsperError):
    """The command line itself is wrong (a bad option value, options that exclude each other)."""

    exit_code = ExitCode.USAGE


class ConfigError(EsperError):
    """The configuration (file, override or plug-in factory) is invalid."""

    exit_code = ExitCode.CONFIG


class CheckpointError(EsperError):
    """A checkpoint failed verification or is unsafe to load."""

    exit_code = ExitCode.CHECKPOINT


class DiskFault(EsperError):
    """The disk refused a write the run needs (ENOSPC, EROFS, EIO, ...): the run halts (exit 6) with the last
    verified checkpoint untouched (S-6)."""

    exit_code = ExitCode.HALTED


class ExpectationFailed(EsperError):
    """A drill or runbook expectation was not met."""

    exit_code = ExitCode.EXPECTATION
