"""The `esper` console script: one Typer app, one module per command group."""

from __future__ import annotations

import os
import sys

import typer

from esper import __version__
from esper.cli import config_cmd, emergency, faults, runbook
from esper.cli.bench import bench
from esper.cli.common import ConfigOpt, EsperGroup, GlobalOptions, QuietOpt, SetOpt, mark_console_script, reader_gone
from esper.cli.compare import compare_cmd
from esper.cli.completion import completion
from esper.cli.drill import simulate_emergency
from esper.cli.evaluate import evaluate
from esper.cli.export import export
from esper.cli.inspect import inspect_checkpoint
from esper.cli.layers import layers
from esper.cli.lifecycle import lifecycle
from esper.cli.plot import plot
from esper.cli.reports import reports
from esper.cli.runs import runs
from esper.cli.train import train
from esper.cli.watch import watch
from esper.core.errors import ExitCode

app = typer.Typer(
    name="esper",
    cls=EsperGroup,
    help="Esper: grow seed modules into a host network, safely, from one TOML file.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion; `esper completion SHELL` prints one shell's script
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"esper {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    quiet: QuietOpt = False,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
) -> None:
    """Global options apply to every command; a command's own --config/--set take precedence."""
    ctx.obj = GlobalOptions(config=config, sets=list(sets or []), quiet=quiet)


app.command("train")(train)
app.command("inspect-checkpoint")(inspect_checkpoint)
app.command("reports")(reports)
app.command("simulate-emergency")(simulate_emergency)
app.command("lifecycle")(lifecycle)
app.add_typer(config_cmd.app, name="config")
app.add_typer(faults.app, name="faults")
app.add_typer(runbook.app, name="runbook")
app.add_typer(emergency.app, name="emergency")
app.command("bench")(bench)
app.command("plot")(plot)
app.command("watch")(watch)
app.command("runs")(runs)
app.command("compare")(compare_cmd)
app.command("layers")(layers)
app.command("export")(export)
app.command("eval")(evaluate)
app.command("completion")(completion)


def _standard_fds() -> None:
    """A closed stdin, stdout or stderr (``esper train --json >&-``) is opened on /dev/null: else the first file
    Esper opens (the events log) would take descriptor 1, and whatever writes to "stdout" would write into it."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            if os.open(os.devnull, os.O_RDWR) != fd:  # the lowest free descriptor: this one
                raise RuntimeError(f"could not reopen file descriptor {fd} on {os.devnull}") from None


def _encodable_output() -> None:
    """Under an ASCII-only locale (``LC_ALL=C PYTHONUTF8=0``) a character the terminal cannot show (×, …, a box
    line) is written as ``?`` rather than ending the command with UnicodeEncodeError; Rich draws ASCII boxes
    there by itself."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "").lower().replace("_", "-")
        if stream is not None and not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")


def run() -> None:
    """Console-script entry point."""
    mark_console_script()
    _standard_fds()
    _encodable_output()
    try:
        app()
    except BrokenPipeError:
        reader_gone()
        sys.exit(int(ExitCode.SIGPIPE))
    except SystemExit:
        try:
            if sys.stdout is not None:
                sys.stdout.flush()
        except BrokenPipeError:
            reader_gone()
            sys.exit(int(ExitCode.SIGPIPE))
        raise
