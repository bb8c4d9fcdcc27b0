"""`esper watch RUN`: the live view of a run started elsewhere, read from its run directory as it grows (V-2).

Exits when the run ends, with the run's own exit code (so `esper watch RUN; echo $?` tells the outcome), or with
9 (INCOMPLETE) when the writer is gone without a summary: killed or crashed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from esper.app.views import read
from esper.app.views.errors import RunIncomplete, ViewUsageError
from esper.app.views.follow import Follower, Update
from esper.app.views.status import INCOMPLETE, State
from esper.cli.common import QuietOpt, global_options, handle_errors, stderr, stdout
from esper.cli.view import RunView, last_text, plain_line, render_summary
from esper.core.errors import ExitCode
from esper.core.records.rundir import is_atomic_temp
from esper.core.records.runlock import LOCK_NAME

IntervalOpt = Annotated[float, typer.Option("--interval", min=0.05, max=10.0,
                                            help="Seconds between looks at the run directory.")]
StartOpt = Annotated[float, typer.Option("--start-timeout", min=0.0,
                                         help="Seconds to wait for a writer in a directory none has locked yet.")]


class _Plain:
    """One line per epoch on stdout (not a terminal, or --quiet)."""

    def __init__(self, follower: Follower) -> None:
        self.f = follower

    def show(self, update: Update) -> None:
        out = stdout()
        for row in [] if update.reset else update.rows:
            out.print(plain_line(row, self.f.planned_epochs), highlight=False, markup=False)


class _Live:
    """The train view's Rich display, fed from the files."""

    def __init__(self, follower: Follower, console: Console) -> None:
        self.f = follower
        self.view = RunView(console, f"run {follower.run.name}", epoch_bar=False)

    def show(self, update: Update) -> None:
        h = self.f.history
        for row in [] if update.reset else update.rows:
            self.view.epoch_end(plain_line(row, self.f.planned_epochs), last_text(row), h.slots)
        planned = self.f.planned_epochs
        where = f"epoch {h.epochs_done}/{planned if planned is not None else '?'}  level {h.level}"
        self.view.run_progress(h.epochs_done, planned, where, h.eta_s())
        if h.slots:
            self.view.show_slots(h.slots)


@handle_errors
def watch(
    ctx: typer.Context,
    run: Annotated[Path, typer.Argument(help="Run directory of a run started elsewhere.")],
    interval: IntervalOpt = 0.5,
    start_timeout: StartOpt = 60.0,
    quiet: QuietOpt = False,
) -> None:
    """Follow a run from its directory until it ends; exit with the run's exit code (9: ended without a summary).
    A directory that does not exist yet (or is still empty) is waited for, up to --start-timeout: `esper watch`
    may be started before the `esper train` it watches."""
    began = time.monotonic()
    _wait_for_run(run, interval, start_timeout, began)
    follower = Follower(run)
    console = stderr()
    plain = quiet or global_options(ctx).quiet or not console.is_terminal
    try:
        if plain:
            ending = _follow(follower, _Plain(follower), interval, start_timeout, began)
        else:
            live = _Live(follower, console)
            with live.view:
                ending = _follow(follower, live, interval, start_timeout, began)
    except KeyboardInterrupt:
        console.print(f"stopped watching {run}; the run itself goes on", highlight=False, markup=False)
        raise typer.Exit(int(ExitCode.SIGINT)) from None
    _end(follower, ending)


def _follow(follower: Follower, shown: _Plain | _Live, interval: float, start_timeout: float,
            began: float) -> State:
    while True:
        update, ending = follower.step()
        for problem in update.skipped:
            stderr().print(f"warning: skipped {problem}", highlight=False, markup=False)
        shown.show(update)
        if ending is not None:
            return ending
        if not follower.seen_writer and time.monotonic() - began > start_timeout:
            raise RunIncomplete(f"{follower.run}: no esper process has started writing it within {start_timeout:g} s "
                                f"(no writer lock, no summary): a run that never started, or one that died "
                                f"before it took its lock")
        time.sleep(interval)  # the polling interval itself: the files are read by offset, only what is new


def _not_yet(run: Path) -> bool:
    """Nothing there yet, or a directory a starting `esper train` has made but not written its files in (its
    writer lock, and config.toml's temp file for the instant before its rename: CI once saw that instant)."""
    if not os.path.lexists(run):
        return True
    try:
        return run.is_dir() and not run.is_symlink() and all(
            name == LOCK_NAME or is_atomic_temp(name) for name in os.listdir(run))
    except OSError:
        return False


def _wait_for_run(run: Path, interval: float, start_timeout: float, began: float) -> None:
    while not read.is_run_dir(run):
        if not _not_yet(run) or time.monotonic() - began > start_timeout:
            waited = f" (waited {start_timeout:g} s for one to appear)" if _not_yet(run) else ""
            raise ViewUsageError(f"{run}: not a run directory (no config.toml, events.jsonl, metrics.jsonl or "
                                 f"summary.json){waited}")
        time.sleep(interval)  # the polling interval: a run that is starting writes its files within seconds


def _end(follower: Follower, ending: State) -> None:
    h = follower.history
    if ending.status == INCOMPLETE or ending.summary is None:
        check = read.check_checkpoint(follower.run)
        resume = (f"; its last checkpoint is {check.path}: resume with `esper train --resume {follower.run}`"
                  if check.ok else f"; no usable checkpoint ({check.detail})")
        planned = follower.planned_epochs
        raise RunIncomplete(f"run {follower.run.name} ended without a summary after epoch {h.epochs_done}/"
                            f"{planned if planned is not None else '?'}: no process holds its "
                            f"writer lock any more (killed or crashed){resume}")
    render_summary(stdout(), ending.summary)
    raise typer.Exit(ending.exit_code if ending.exit_code is not None else int(ExitCode.INTERNAL))
