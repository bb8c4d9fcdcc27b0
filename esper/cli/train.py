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
from esper.core.config import ENV_VAR, operator_config
from esper.core.session import TrainSession

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
        self.last = (f"val loss {_fmt(row['val_loss'])} acc {_fmt(row['val_accuracy'])} "
                     f"params {row['params']} level {row['emergency_level']}")
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
    return (f"epoch {row['epoch']}/{epochs} train_loss={_fmt(row['train_loss'])} "
            f"train_acc={_fmt(row['train_accuracy'])} val_loss={_fmt(row['val_loss'])} "
            f"val_acc={_fmt(row['val_accuracy'])} params={row['params']} seeds={stages} "
            f"level={row['emergency_level']}")


def render_summary(console: Console, summary: dict[str, Any]) -> None:
    final = summary["final"]
    status = summary["status"]
    colour = "green" if status == "COMPLETED" else "yellow" if status == "STOPPED" else "red"
    console.print(Text.assemble((status, f"bold {colour}"), f" run {summary['run_id']} after "
                                f"{summary['epochs_completed']} epoch(s): val_loss={_fmt(final['val_loss'])} "
                                f"val_accuracy={_fmt(final['val_accuracy'])} params={final['params']}"),
                  highlight=False)
    for s in summary["seeds"]:
        path = " -> ".join([s["history"][0]["source"], *(h["dest"] for h in s["history"])]) if s["history"] else "-"
        console.print(f"  slot {s['slot']}: {s['stage']} ({s['blueprint'] or '-'})  {path}", highlight=False,
                      markup=False)
    growth = summary.get("growth") or {}
    if growth.get("warning"):
        console.print(Text.assemble(("warning:", "yellow"), f" {growth['warning']}"), highlight=False)
    if summary.get("failure"):
        console.print(Text.assemble(("failure:", "red"), f" {summary['failure']['type']}: "
                                    f"{summary['failure']['message']}"), highlight=False)
    console.print(f"run directory: {summary['run_dir']}", highlight=False, markup=False)
    if summary.get("checkpoint"):
        console.print(f"last verified checkpoint: {summary['checkpoint']}", highlight=False, markup=False)


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
    """Train the host and grow seeds as configured; writes the run directory (one writer at a time: exit 8).

    --run-dir must be new or empty; continue a run with --resume. With --resume and no --config (nor
    $ESPER_CONFIG), the checkpoint's own config is the base (--set still overrides it), but any code reference
    or path in it must also be in your own config (./esper.toml if there is one, else the defaults, plus --set):
    a checkpoint never names code to run (exit 4). A config that differs from the checkpoint's is refused
    unless --allow-config-change names every changed key (exit 3).
    """
    g = global_options(ctx)
    quiet = quiet or g.quiet
    overrides = [*g.sets, *(sets or [])]
    plain = resume is not None and config is None and g.config is None and not os.environ.get(ENV_VAR)
    own = operator_config(overrides) if plain else load_config(ctx, config, sets).config
    session = TrainSession.prepare(own, run_dir=run_dir, resume=resume, base="checkpoint" if plain else "config",
                                   overrides=overrides, faults=list(fault or []),
                                   allow_config_change=list(allow_config_change or []))
    epochs = session.cfg.trainer.epochs
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
    for lost in summary.get("record_errors") or []:
        stderr().print(f"error: {lost}", highlight=False, markup=False)
    raise typer.Exit(summary["exit_code"])
