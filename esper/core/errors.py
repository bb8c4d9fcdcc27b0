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
    SIGTERM = 143


class EsperError(Exception):
    """Base of Esper's typed errors; ``exit_code`` is what the CLI exits with."""

    exit_code: ExitCode = ExitCode.INTERNAL


class ConfigError(EsperError):
    """The configuration (file, override or plug-in factory) is invalid."""

    exit_code = ExitCode.CONFIG


class CheckpointError(EsperError):
    """A checkpoint failed verification or is unsafe to load."""

    exit_code = ExitCode.CHECKPOINT


class ExpectationFailed(EsperError):
    """A drill or runbook expectation was not met."""

    exit_code = ExitCode.EXPECTATION
