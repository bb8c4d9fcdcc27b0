"""`esper train`: run the configured job, with a live view (or plain lines, or one JSON summary)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from esper.cli.common import (
    ConfigOpt,
    JsonOpt,
    QuietOpt,
    SetOpt,
    global_options,
    handle_errors,
    load_config,
    print_json,
    stderr,
    stdout,
)
from esper.core.config import ENV_VAR
from esper.core.session import Resume, TrainSession

RunDirOpt = Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: run.output_dir/RUN_ID).")]
ResumeOpt = Annotated[Path | None, typer.Option("--resume", help="Checkpoint dir, run dir or manifest to resume.")]
FaultOpt = Annotated[list[str] | None, typer.Option("--fault", help="Inject NAME@EPOCH[:STEP] (repeatable).")]
AllowOpt = Annotated[list[str] | None, typer.Option(
    "--allow-config-change", help="On resume, accept these changed config keys (repeatable dotted keys).")]


def _fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def slot_table(slots: list[dict[str, Any]]) -> Table:
    table = Table(title="slots", title_justify="left", expand=False)
    for col in ("slot", "layer", "seed", "blueprint", "stage", "alpha", "epochs in stage"):
        table.add_column(col)
    for s in slots:
        table.add_row(s["slot"], s["layer"], s["seed_id"] or "-", s["blueprint"] or "-", s["stage"],
                      f"{s['alpha']:.2f}", str(s["epochs_in_stage"]))
    return table


class RichReporter:
    """Progress bar per epoch with loss/accuracy, and a live table of slots (on stderr)."""

    def __init__(self, console: Console, epochs: int) -> None:
        self.console = console
        self.epochs = epochs
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=console)
        self.task = self.progress.add_task("train", total=1, epoch=0, epochs=epochs, loss="-", last="")
        self.slots = Table()
        self.live = Live(Group(self.progress, self.slots), console=console, refresh_per_second=8, transient=False)
        self.last = ""

    def __enter__(self) -> RichReporter:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)

    def epoch_start(self, epoch: int, steps: int) -> None:
        # reset replaces the task's fields: pass every field the columns render
        self.progress.reset(self.task, total=steps, epoch=epoch, epochs=self.epochs, loss="-", last=self.last)

    def step(self, loss: float) -> None:
        self.progress.update(self.task, advance=1, loss=f"{loss:.4f}")

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        self.last = (f"{_metrics(row, 'val_')} params {row['params']} level {row['emergency_level']}")
        self.progress.update(self.task, last=self.last)
        self.console.print(plain_line(row, self.epochs), highlight=False)
        self.live.update(Group(self.progress, slot_table(slots)))


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


def plain_line(row: dict[str, Any], epochs: int) -> str:
    stages = ",".join(f"{k}:{v}" for k, v in row["seeds_by_stage"].items()) or "-"
    return (f"epoch {row['epoch']}/{epochs} {_metrics(row, 'train_')} {_metrics(row, 'val_')} "
            f"params={row['params']} seeds={stages} level={row['emergency_level']}")


def _metrics(row: dict[str, Any], prefix: str) -> str:
    """The loss and every task metric of a row (or of summary.json's ``final``) with ``prefix``, loss first."""
    names = [k for k in row if k.startswith(prefix) and k != f"{prefix}loss"]
    return " ".join(f"{k}={_fmt(row[k])}" for k in [f"{prefix}loss", *names] if k in row)


def render_summary(console: Console, summary: dict[str, Any]) -> None:
    final = summary["final"]
    status = summary["status"]
    colour = "green" if status == "COMPLETED" else "yellow" if status == "STOPPED" else "red"
    console.print(f"[bold {colour}]{status}[/] run {summary['run_id']} after {summary['epochs_completed']} epoch(s): "
                  f"{_metrics(final, 'val_')} params={final['params']}", highlight=False)
    for s in summary["seeds"]:
        path = " -> ".join([s["history"][0]["source"], *(h["dest"] for h in s["history"])]) if s["history"] else "-"
        console.print(f"  slot {s['slot']}: {s['stage']} ({s['blueprint'] or '-'})  {path}", highlight=False)
    if summary.get("failure"):
        # the message is data, not markup: shapes like [N, C, L] must survive (contracts C4)
        console.print(Text.assemble(("failure:", "red"), f" {summary['failure']['type']}: "
                                                          f"{summary['failure']['message']}"), highlight=False)
    console.print(f"run directory: {summary['run_dir']}", highlight=False)
    if summary.get("checkpoint"):
        console.print(f"last verified checkpoint: {summary['checkpoint']}", highlight=False)


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
) -> None:
    """Train the host and grow seeds as configured; writes the run directory.

    With --resume and no --config, the checkpoint's own config is the base (--set still overrides it); a
    config that differs from the checkpoint's is refused unless --allow-config-change names every changed key.
    """
    g = global_options(ctx)
    quiet = quiet or g.quiet
    checkpoint: Resume | None = None
    if resume is not None and config is None and g.config is None and not os.environ.get(ENV_VAR):
        checkpoint = Resume.load(resume)
        cfg = checkpoint.config_with([*g.sets, *(sets or [])])
    else:
        cfg = load_config(ctx, config, sets).config
        checkpoint = Resume.load(resume) if resume is not None else None
    session = TrainSession.prepare(cfg, run_dir=run_dir, resume=checkpoint, faults=list(fault or []),
                                   allow_config_change=list(allow_config_change or []))
    epochs = cfg.trainer.epochs
    if as_json:
        summary = session.run(reporter=None)
        print_json(summary)
    elif quiet:
        with PlainReporter(stdout(), epochs) as reporter:
            summary = session.run(reporter=reporter)
        render_summary(stdout(), summary)
    else:
        with RichReporter(stderr(), epochs) as reporter:
            summary = session.run(reporter=reporter)
        render_summary(stdout(), summary)
    raise typer.Exit(summary["exit_code"])
