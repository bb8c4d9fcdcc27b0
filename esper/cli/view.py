"""The view of a run, shared by `esper train` (fed by the trainer as it runs) and `esper watch` (fed by the run's
files as they grow): a bar over the whole run with its ETA, the epoch's bar (train only: steps and the epoch's
running mean loss), the last epoch's figures and level, and the slot table. And the plain form: one line per
epoch, for logs and CI.

Everything shown that comes from data (slot names, blueprints, stages, reasons) is rendered as plain text, never
as Rich markup, so bracketed text is shown as it is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def fmt(v: Any, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def eta_text(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-:--:--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def slot_table(slots: list[dict[str, Any]]) -> Table:
    table = Table(title="slots", title_justify="left", expand=False)
    for col in ("slot", "layer", "seed", "blueprint", "stage", "alpha", "alpha mean", "gate sparsity",
                "epochs in stage"):
        table.add_column(col)

    def num(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, int | float) else "-"

    for s in slots:
        cells = (s.get("slot"), s.get("layer"), s.get("seed_id") or "-", s.get("blueprint") or "-", s.get("stage"),
                 num(s.get("alpha")), num(s.get("alpha_mean")), num(s.get("gate_sparsity")), s.get("epochs_in_stage"))
        table.add_row(*(Text(fmt(c)) for c in cells))
    return table


def plain_line(row: dict[str, Any], epochs: int | None) -> str:
    stages = row.get("seeds_by_stage")
    stages = ",".join(f"{k}:{v}" for k, v in stages.items()) if isinstance(stages, dict) and stages else "-"
    return (f"epoch {fmt(row.get('epoch'))}/{fmt(epochs)} {metrics_text(row, 'train_')} {metrics_text(row, 'val_')} "
            f"params={fmt(row.get('params'))} seeds={stages} level={fmt(row.get('emergency_level'))}"
            + (f" flops={si(row['flops'])}" if isinstance(row.get("flops"), int) else ""))


def si(n: float) -> str:
    """A count for a person: 3.58G, 912M, 41.2k."""
    for div, unit in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def metrics_text(row: dict[str, Any], prefix: str) -> str:
    """The loss and every task metric of a row (or of summary.json's ``final``) with ``prefix``, loss first."""
    names = [k for k in row if isinstance(k, str) and k.startswith(prefix) and k != f"{prefix}loss"]
    return " ".join(f"{k}={fmt(row.get(k))}" for k in [f"{prefix}loss", *names])


def last_text(row: dict[str, Any]) -> str:
    flops = f" flops {si(row['flops'])}" if isinstance(row.get("flops"), int) else ""
    return (f"{metrics_text(row, 'val_').replace('=', ' ')} params {fmt(row.get('params'))}{flops} "
            f"level {fmt(row.get('emergency_level'))}")


class RunView:
    """The live display: ``run_bar`` over the whole run (units: steps for train, epochs for watch), an optional
    epoch bar, and the slot table, in one Rich ``Live`` on ``console`` (stderr)."""

    def __init__(self, console: Console, title: str, *, epoch_bar: bool) -> None:
        self.console = console
        self.run_bar = Progress(TextColumn("{task.fields[title]}", style="bold", markup=False), BarColumn(),
                                TextColumn("{task.fields[where]}", markup=False),
                                TextColumn("ETA {task.fields[eta]}", markup=False), TimeElapsedColumn(),
                                console=console)
        self.run_task = self.run_bar.add_task("run", total=None, title=title, where="", eta=eta_text(None))
        self.epoch_bar: Progress | None = None
        if epoch_bar:
            self.epoch_bar = Progress(TextColumn("epoch {task.fields[epoch]}/{task.fields[epochs]}", style="bold",
                                                 markup=False), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("loss {task.fields[loss]}", markup=False),
                                      TextColumn("{task.fields[last]}", markup=False), console=console)
            self.epoch_task = self.epoch_bar.add_task("epoch", total=1, epoch=0, epochs="-", loss="-", last="")
        self.slots: Table | Text = Text("")
        self.live = Live(self._group(), console=console, refresh_per_second=8, transient=False)

    def _group(self) -> Group:
        parts: list[Any] = [self.run_bar]
        if self.epoch_bar is not None:
            parts.append(self.epoch_bar)
        return Group(*parts, self.slots)

    def __enter__(self) -> RunView:
        self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.live.__exit__(None, None, None)
        if not self.console.is_terminal:
            self.console.line()  # Live ends a non-terminal stream mid-line: what follows must start on its own

    def run_progress(self, done: float, total: float | None, where: str, eta: float | None) -> None:
        self.run_bar.update(self.run_task, completed=done, total=total, where=where, eta=eta_text(eta))

    def epoch_start(self, epoch: int, epochs: int | None, steps: int, last: str) -> None:
        if self.epoch_bar is not None:  # reset replaces the task's fields: pass every field the columns render
            self.epoch_bar.reset(self.epoch_task, total=steps, epoch=epoch, epochs=fmt(epochs), loss="-", last=last)

    def step(self, loss: float) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.update(self.epoch_task, advance=1, loss=f"{loss:.4f}")

    def epoch_end(self, line: str, last: str, slots: list[dict[str, Any]]) -> None:
        if self.epoch_bar is not None:
            self.epoch_bar.update(self.epoch_task, last=last)
        self.console.print(line, highlight=False, markup=False)
        self.show_slots(slots)

    def show_slots(self, slots: list[dict[str, Any]]) -> None:
        self.slots = slot_table(slots)
        self.live.update(self._group())


def render_summary(console: Console, summary: dict[str, Any]) -> None:
    """The outcome of a run, from its summary (which `watch` reads from a file: nothing in it is trusted)."""
    final = summary.get("final") if isinstance(summary.get("final"), dict) else {}
    status = str(summary.get("status"))
    colour = "green" if status == "COMPLETED" else "yellow" if status == "STOPPED" else "red"
    console.print(Text.assemble((status, f"bold {colour}"),
                                f" run {summary.get('run_id')} after {summary.get('epochs_completed')} epoch(s): "
                                f"{metrics_text(final, 'val_')} params={fmt(final.get('params'))}"), highlight=False)
    seeds = summary.get("seeds") if isinstance(summary.get("seeds"), list) else []
    for s in (s for s in seeds if isinstance(s, dict)):
        history = [h for h in s.get("history") or [] if isinstance(h, dict)]
        path = " -> ".join([str(history[0].get("source")), *(str(h.get("dest")) for h in history)]) if history \
            else "-"
        console.print(Text(f"  slot {s.get('slot')}: {s.get('stage')} ({s.get('blueprint') or '-'})  {path}"),
                      highlight=False)
    growth = summary.get("growth") if isinstance(summary.get("growth"), dict) else {}
    if growth.get("warning"):
        console.print(Text.assemble(("warning:", "yellow"), f" {growth['warning']}"), highlight=False)
    if status == "HALTED":  # what raised the level, so the operator need not dig the events out
        emergencies = summary.get("emergencies") if isinstance(summary.get("emergencies"), list) else []
        for e in [e for e in emergencies if isinstance(e, dict)][-3:]:
            console.print(Text.assemble(("emergency:", "red"), f" {e.get('source')} -> {e.get('dest')}: "
                                                               f"{e.get('reason')}"), highlight=False)
    failure = summary.get("failure")
    if isinstance(failure, dict):
        console.print(Text.assemble(("failure:", "red"), f" {failure.get('type')}: {failure.get('message')}"),
                      highlight=False)
        where = failure.get("raised_at")
        if isinstance(where, dict):
            whose = {"user": "your code", "library": "a library", "esper": "Esper's code"}.get(str(where.get("origin")),
                                                                                             "?")
            console.print(Text(f"  raised in {whose}: {where.get('file')}:{where.get('line')} in "
                               f"{where.get('function')}"), highlight=False)
        if failure.get("traceback"):
            console.print(Text(f"  the traceback: {Path(str(summary.get('run_dir')), 'summary.json')} "
                               "(failure.traceback)"), highlight=False)
    console.print(Text(f"run directory: {summary.get('run_dir')}"), highlight=False)
    if summary.get("checkpoint"):
        console.print(Text(f"last verified checkpoint: {summary.get('checkpoint')}"), highlight=False)
