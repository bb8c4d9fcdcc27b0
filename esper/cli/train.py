"""`esper train`: run the configured job, with a live view (or plain lines, or one JSON summary)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from esper.cli.common import (
    ConfigOpt,
    JsonOpt,
    QuietOpt,
    SetOpt,
    console_script,
    global_options,
    handle_errors,
    load_config,
    print_json,
    stderr,
)
from esper.cli.unblocked import consoles, settle
from esper.cli.view import RunView, last_text, plain_line, render_summary
from esper.core.config import ENV_VAR, operator_config

if TYPE_CHECKING:
    from esper.app import scaleout
    from esper.app.session import TrainSession

RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: run.output_dir/RUN_ID).")]
ResumeOpt = Annotated[Path | None, typer.Option("--resume", help="Checkpoint dir, run dir or manifest to resume.")]
FaultOpt = Annotated[list[str] | None, typer.Option("--fault", help="Inject NAME@EPOCH[:STEP] (repeatable).")]
NprocOpt = Annotated[int | None, typer.Option(
    "--nproc", help="Train data-parallel on N processes of this machine (torch's elastic launcher, gloo on cpu).")]
RestartsOpt = Annotated[int, typer.Option(
    "--max-restarts", help="With --nproc: restart the whole group this many times after a worker dies.")]
AllowOpt = Annotated[list[str] | None, typer.Option(
    "--allow-config-change", help="On resume, accept these changed config keys (repeatable dotted keys).")]


class RichReporter:
    """The live view while training (on stderr): the whole run's bar with its ETA (at this session's mean pace
    per step), the epoch's bar with its running mean loss, the last validation figures and the slot table."""

    def __init__(self, console: Console, epochs: int, title: str = "run") -> None:
        self.console = console
        self.epochs = epochs
        self.view = RunView(console, title, epoch_bar=True)
        self.last = ""
        self._t0: float | None = None
        self._steps_seen = 0
        self._position = 0
        self._steps = 0

    def __enter__(self) -> RichReporter:
        self.view.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.view.__exit__(*exc)

    def epoch_start(self, epoch: int, steps: int) -> None:
        if self._t0 is None:
            self._t0 = time.monotonic()
        self._steps = steps
        self._position = (epoch - 1) * steps  # a replay after a rollback starts its epoch again
        self.view.epoch_start(epoch, self.epochs, steps, self.last)
        self._progress(epoch)

    def step(self, loss: float) -> None:
        self._steps_seen += 1
        self._position += 1
        self.view.step(loss)
        self._progress(None)

    def _progress(self, epoch: int | None) -> None:
        total = self.epochs * self._steps
        eta = None
        if self._t0 is not None and self._steps_seen:
            eta = (time.monotonic() - self._t0) / self._steps_seen * max(total - self._position, 0)
        where = f"step {self._position}/{total}"
        self.view.run_progress(self._position, total, where, eta)

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        self.last = last_text(row)
        self.view.epoch_end(plain_line(row, self.epochs), self.last, slots)

    def notice(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)


class PlainReporter:
    """One line per epoch, for logs and CI."""

    def __init__(self, console: Console, epochs: int) -> None:
        self.console = console
        self.epochs = epochs

    def __enter__(self) -> PlainReporter:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def epoch_start(self, epoch: int, steps: int) -> None:
        return None

    def step(self, loss: float) -> None:
        return None

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        self.console.print(plain_line(row, self.epochs), highlight=False, markup=False)

    def notice(self, text: str) -> None:
        self.console.print(text, highlight=False, markup=False)


@handle_errors
def train(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    run_dir: RunDirOpt = None,
    resume: ResumeOpt = None,
    fault: FaultOpt = None,
    allow_config_change: AllowOpt = None,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    nproc: NprocOpt = None,
    max_restarts: RestartsOpt = 0,
) -> None:
    """Train the host and grow seeds as configured; writes the run directory (one writer at a time: exit 8).

    --run-dir must be new or empty; continue a run with --resume. With --resume and no --config (nor
    $ESPER_CONFIG), the checkpoint's own config is the base (--set still overrides it), but any code reference
    or path in it must also be in your own config (./esper.toml if there is one, else the defaults, plus --set):
    a checkpoint never names code to run (exit 4). A config that differs from the checkpoint's is refused
    unless --allow-config-change names every changed key (exit 3).
    """
    if nproc is not None:
        from esper.cli.launch import launch

        raise typer.Exit(launch(nproc, max_restarts))
    # torch and the engine: paid by the commands that train, not by every `esper` invocation
    from esper.app import scaleout
    from esper.core.dist import joined

    g = global_options(ctx)
    quiet = quiet or g.quiet
    overrides = [*g.sets, *(sets or [])]
    plain = resume is not None and config is None and g.config is None and not os.environ.get(ENV_VAR)
    own = operator_config(overrides) if plain else load_config(ctx, config, sets).config
    with joined(own) as world:  # a no-op outside torchrun
        session = scaleout.prepare(own, run_dir=run_dir, resume=resume, base="checkpoint" if plain else "config",
                                   overrides=overrides, faults=list(fault or []),
                                   allow_config_change=list(allow_config_change or []))
        if not world.writer:  # rank > 0: no view, no summary on the terminal (rank 0 speaks for the run)
            raise typer.Exit(session.run(reporter=None)["exit_code"])
        _run(session, as_json, quiet)


@contextlib.contextmanager
def settled_outcome(summary: Path) -> Iterator[None]:
    """Once this session's ``summary.json`` is written the outcome is decided: a SIGINT/SIGTERM in the second
    after it (while the run directory is released and the outcome printed) is ignored, so the exit status is
    always the recorded one. Before that, a signal means what it always does (training's own handlers stop the
    run gracefully; outside them SIGINT raises KeyboardInterrupt and SIGTERM ends the process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    started = time.time_ns()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if _settled(summary, started):
            return  # this session's outcome is on disk: exit with it
        if signum == signal.SIGINT:
            signal.default_int_handler(signum, frame)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if _settled(summary, started) and console_script():
            for s in previous:  # the process exits with the recorded outcome; nothing may change that now
                signal.signal(s, signal.SIG_IGN)
        else:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _settled(summary: Path, started: int) -> bool:
    try:
        return os.stat(summary).st_mtime_ns >= started
    except OSError:  # no summary yet
        return False


def _run(session: TrainSession | scaleout.FollowerSession, as_json: bool, quiet: bool) -> None:
    with settled_outcome(session.run_dir.summary):
        _run_settled(session, as_json, quiet)


def _run_settled(session: TrainSession | scaleout.FollowerSession, as_json: bool, quiet: bool) -> None:
    epochs = session.cfg.trainer.epochs
    if as_json:
        summary = session.run(reporter=None)
        print_json(summary)
        _record_errors(stderr(), summary)
        raise typer.Exit(summary["exit_code"])
    with consoles() as (out, err):  # a terminal or pipe nobody reads never blocks a step (nor a stop)
        if quiet:
            with PlainReporter(out, epochs) as reporter:
                summary = session.run(reporter=reporter)
        else:
            with RichReporter(err, epochs, title=f"run {session.run_dir.run_id}") as reporter:
                summary = session.run(reporter=reporter)
            settle(err)  # the live view's last frame ends its line before the outcome starts one
        render_summary(out, summary)
        _record_errors(err, summary)
    raise typer.Exit(summary["exit_code"])


def _record_errors(console: Console, summary: dict[str, Any]) -> None:
    for lost in summary.get("record_errors") or []:
        console.print(f"error: {lost}", highlight=False, markup=False)
