"""`esper plot RUN... [-o FILE.png]`: curves, the seeds' lifecycle and emergencies of one or several runs (V-1)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esper.app.views import read
from esper.app.views.errors import ViewUsageError
from esper.app.views.status import Run
from esper.cli.common import JsonOpt, handle_errors, print_json, stderr


@handle_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (several: one figure, one legend entry each).")],
    output: Annotated[Path | None, typer.Option("--output", "-o", show_default=False,
                                                help="PNG to write (default RUN/plot.png; required for several "
                                                     "runs).")] = None,
    labels: Annotated[list[str] | None, typer.Option("--label", help="Legend name of each run, in order "
                                                     "(default: run ids).", show_default=False)] = None,
    x_axis: Annotated[str, typer.Option("--x", help="The x axis: epoch, or flops (the run's cumulative "
                                         "training FLOPs: compare a grown run with a larger one at equal "
                                         "compute).")] = "epoch",
    as_json: JsonOpt = False,
) -> None:
    """Write a PNG: train/val loss and the primary metric per epoch, parameters, a band per slot coloured by seed
    stage, markers for emergencies (by level), rollbacks and checkpoints."""
    from esper.app.views.plot import X_AXES, render  # matplotlib: paid by `esper plot` alone, not every command

    if x_axis not in X_AXES:
        raise ViewUsageError(f"--x {x_axis!r}: choose one of {', '.join(X_AXES)}")
    for run in runs:
        if not read.is_run_dir(run):
            raise ViewUsageError(f"{run}: not a run directory (no config.toml, events.jsonl, metrics.jsonl or "
                                 f"summary.json)")
    if output is None:
        if len(runs) > 1:
            raise ViewUsageError(f"{len(runs)} runs: name the figure with -o FILE.png")
        output = runs[0] / "plot.png"
    if output.suffix.lower() != ".png":
        raise ViewUsageError(f"{output}: the figure is a PNG; name it FILE.png")
    if not output.parent.is_dir():
        raise ViewUsageError(f"{output.parent}: no such directory for the figure")
    loaded = [Run.load(run) for run in runs]
    if labels and len(labels) != len(runs):
        raise ViewUsageError(f"{len(labels)} --label for {len(runs)} runs: give one per run, in order")
    names = list(labels) if labels else [r.run_id for r in loaded]
    empty = [str(r.path) for r in loaded if not r.history.rows]
    if len(empty) == len(loaded):
        raise ViewUsageError(f"nothing to plot: no epoch has completed in {', '.join(empty)}")
    drawn = render(loaded, names, output, x_axis)
    drawn["problems"] = {r.run_id: r.problems for r in loaded if r.problems}
    if as_json:
        print_json(drawn)
        return
    err = stderr()
    for run_id, problems in drawn["problems"].items():
        for problem in problems:
            err.print(f"{run_id}: {problem}", highlight=False, markup=False)
    err.print(f"wrote {output}", highlight=False, markup=False)
