"""`esper runbook run FILE`: execute a runbook's steps and report each (SPEC §6 E-3)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from esper.app import proctree
from esper.app.runbook import RunbookResult, Step, load_runbook, run_runbook
from esper.cli.common import JsonOpt, handle_errors, print_json, stderr, stdout
from esper.core.errors import EsperError, ExitCode, ExpectationFailed

app = typer.Typer(help="Run operational runbooks: esper command steps with expectations.", no_args_is_help=True)

class RunbookStopped(EsperError):
    """A signal stopped the runbook; its exit code is the signal's (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(code)


KeepOpt = Annotated[bool, typer.Option("--keep", help="Keep the shared work directory (its path is printed).")]


@app.callback()
def _group() -> None:
    """Runbooks: TOML files of esper command steps and expectations on their exit codes and --json output."""


@app.command("run")
@handle_errors
def run(
    file: Annotated[Path, typer.Argument(help="Runbook TOML file.", show_default=False)],
    as_json: JsonOpt = False,
    keep: KeepOpt = False,
) -> None:
    """Run every step in order in one temporary work directory; exit 7 at the first unmet expectation."""
    rb = load_runbook(file)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", rb.name)[:40]
    err = stderr()
    total = len(rb.steps)

    def announce(index: int, step: Step) -> None:
        err.print(f"[dim]step {index + 1}/{total}:[/] {step.name}", highlight=False)

    workdir: Path | None = None
    try:
        with proctree.interruptible():  # from before the directory exists: no signal can leave it behind
            workdir = Path(tempfile.mkdtemp(prefix=f"esper-runbook-{slug}-"))
            result = run_runbook(rb, workdir, on_step=None if as_json else announce)
    except proctree.Interrupted as stop:
        # the step's whole tree has ended (run_command), so nothing writes into the work directory any more
        where = f"kept: {workdir}" if keep else "removed"
        raise RunbookStopped(f"runbook {rb.name!r} {stop}: its step was stopped, its work directory {where}",
                             128 + stop.signum) from None
    finally:
        if not keep and workdir is not None:
            shutil.rmtree(workdir)
    if as_json:
        print_json(result.to_dict(kept=keep))
    else:
        stdout().print(result_table(result))
    if keep:
        err.print(f"work directory kept: {workdir}", highlight=False)
    failed = result.failed_step
    if failed is not None:
        raise ExpectationFailed(f"runbook {rb.name!r} failed at step {failed.name!r}: {failed.failure}")
    if not as_json:
        err.print(f"[green]passed[/]: runbook {rb.name!r}, {total} step(s)", highlight=False)


def result_table(result: RunbookResult) -> Table:
    """One row per step: name, status, exit code got/expected, duration, then the command and each expectation."""
    table = Table(title=f"runbook {result.runbook.name}", title_justify="left")
    # narrow fixed columns first; the command and expectations fold into the one wide column, never elided
    table.add_column("step", overflow="fold", max_width=28)
    table.add_column("status", no_wrap=True)
    table.add_column("exit", no_wrap=True)
    table.add_column("time", no_wrap=True, justify="right")
    table.add_column("command / expectations", overflow="fold", ratio=1)
    colours = {"passed": "green", "failed": "bold red", "skipped": "dim"}
    for s in result.steps:
        exit_cell = ("-" if s.status == "skipped" else "timeout" if s.timed_out
                     else f"{s.exit_code} (want {s.expected_exit_code})")
        details = Text(f"$ {s.command}", style="bold")
        for e in s.expectations:
            details.append("\nok   " if e.passed else "\nFAIL ", style="green" if e.passed else "red")
            details.append(e.expectation.describe() if e.passed else e.describe())
        if s.failure and all(e.passed for e in s.expectations):
            details.append(f"\n{s.failure}", style="red")
        table.add_row(s.name, Text(s.status, style=colours[s.status]), exit_cell,
                      "-" if s.status == "skipped" else f"{s.duration_s:.1f}s", details)
    return table
