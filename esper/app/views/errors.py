"""The operator views' typed errors (the CLI's one error path prints them and exits with their code)."""

from __future__ import annotations

from esper.core.errors import EsperError, ExitCode


class ViewUsageError(EsperError):
    """What was asked cannot be shown: not a run directory, a missing output folder, labels that do not match."""

    exit_code = ExitCode.USAGE


class RunIncomplete(EsperError):
    """The run ended without a summary of its last session: its writer was killed or crashed."""

    exit_code = ExitCode.INCOMPLETE
