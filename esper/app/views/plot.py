"""``esper plot`` (V-1): one PNG of one or several runs — train/val loss and the task's primary metric per epoch,
the parameter count, one band per slot coloured by seed stage, and vertical markers for emergencies (coloured by
level), rollbacks and checkpoints.

Rendered with matplotlib's Agg canvas directly (no pyplot, no display, no global backend state). Stage colours
come from the seed table (one colour per state, in the table's order) and level colours from the emergency
table, so a new state gets a colour without anyone listing it here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from esper.app.views.errors import ViewUsageError
from esper.app.views.history import RunHistory
from esper.app.views.status import Run
from esper.statemachines import EMERGENCY, SEED

_STAGES = colormaps["Paired"].resampled(len(SEED.state_names))  # qualitative, no grey
_LEVELS = colormaps["YlOrRd"]
_RUNS = colormaps["tab10"]
MOMENTS = ("germinate", "fossilize", "cull")  # triggers marked on the bands (a diamond in the stage entered)
DPI = 100
WIDTH_IN = 11.0


def stage_colour(stage: str) -> tuple[float, float, float, float]:
    return _STAGES(SEED.state_names.index(stage))


def level_colour(level: str) -> tuple[float, float, float, float]:
    top = max(v for _, v, _ in EMERGENCY.states)
    return _LEVELS(0.35 + 0.65 * EMERGENCY.value_of(level) / top)


def _end(h: RunHistory) -> float:
    return float(max(h.epochs_done, max((t.epoch for t in h.transitions), default=0), 1))


Axis = Callable[[Sequence[float]], list[float]]
X_AXES = ("epoch", "flops")


def x_axis(h: RunHistory, kind: str, name: str) -> Axis:
    """Where an epoch (fractional: a transition inside one) lies on the x axis: itself, or the run's cumulative
    training FLOPs, linear within an epoch between the FLOPs at its start and its end."""
    if kind == "epoch":
        return lambda xs: [float(x) for x in xs]
    epochs, flops = h.series("flops")
    if not epochs:
        raise ViewUsageError(f"{name}: its metrics rows carry no FLOP counts (written before Esper counted "
                             f"them): plot it with --x epoch")
    at, value = [0.0, *map(float, epochs)], [0.0, *flops]
    return lambda xs: [float(v) for v in numpy.interp(list(xs), at, value)]


def _markers(ax: Axes, h: RunHistory, *, ticks: bool, x: Axis) -> None:
    # one collection per kind (and level), each epoch once: a long run's tens of thousands of checkpoints are one
    # artist, not one line each
    groups: dict[tuple[str, str | None], set[float]] = {}
    for m in h.markers:
        if m.kind in ("emergency", "rollback") or (m.kind == "checkpoint" and ticks):
            groups.setdefault((m.kind, m.level if m.kind == "emergency" else None), set()).add(float(m.epoch))
    across = ax.get_xaxis_transform()  # x in epochs, y in axis fractions
    for (kind, level), xs in groups.items():
        at = x(sorted(xs))
        if kind == "emergency" and level is not None:
            ax.vlines(at, 0.0, 1.0, transform=across, colors=[level_colour(level)], linestyles="--", linewidth=1.6)
        elif kind == "rollback":
            ax.vlines(at, 0.0, 1.0, transform=across, colors="black", linestyles=":", linewidth=1.4)
        elif kind == "checkpoint":
            ax.vlines(at, 0.0, 0.06, transform=across, colors="dimgray", linewidth=1.0)


def render(runs: list[Run], labels: list[str], out: Path, x_kind: str = "epoch") -> dict[str, object]:
    """Draw ``runs`` (legend entries ``labels``) into the PNG ``out`` (written atomically) against ``x_kind``
    (``epoch`` or cumulative training ``flops``); what was drawn."""
    axes = [x_axis(r.history, x_kind, str(r.path)) for r in runs]
    band_rows = [(i, slot) for i, r in enumerate(runs) for slot in r.history.slot_names()]
    fig = Figure(figsize=(WIDTH_IN, 9.0 + 0.3 * max(len(band_rows) - 2, 0)), dpi=DPI, layout="constrained")
    grid = fig.add_gridspec(4, 1, height_ratios=[3.0, 3.0, 1.6, 0.9 + 0.35 * max(len(band_rows), 1)])
    loss = fig.add_subplot(grid[0])
    metric = fig.add_subplot(grid[1], sharex=loss)
    params = fig.add_subplot(grid[2], sharex=loss)
    bands = fig.add_subplot(grid[3], sharex=loss)
    primaries = sorted({r.history.primary for r in runs})
    for i, (r, label) in enumerate(zip(runs, labels, strict=True)):
        h, colour, x = r.history, _RUNS(i % 10), axes[i]

        def series(key: str, h: RunHistory = h, x: Axis = x) -> tuple[list[float], list[float]]:
            xs, ys = h.series(key)
            return x(xs), ys

        who = f"{label} " if len(runs) > 1 else ""  # one run: its name is the title
        loss.plot(*series("train_loss"), color=colour, linestyle="--", marker=".", label=f"{who}train")
        loss.plot(*series("val_loss"), color=colour, linestyle="-", marker=".", label=f"{who}val")
        metric.plot(*series(h.primary), color=colour, marker=".", label=f"{who}{h.primary}")
        train_key = "train_" + h.primary.removeprefix("val_")
        if h.primary.startswith("val_") and h.series(train_key)[0]:
            metric.plot(*series(train_key), color=colour, linestyle=":", label=f"{who}{train_key}")
        params.step(*series("params"), where="post", color=colour, label=label if len(runs) > 1 else "parameters")
        for ax in (loss, metric, params):
            _markers(ax, h, ticks=True, x=x)
    seen_stages: list[str] = []
    for y, (i, slot) in enumerate(band_rows):
        h, x = runs[i].history, axes[i]
        for start, stop, stage in h.bands(_end(h)).get(slot, []):
            left, right = x([start, stop])
            bands.broken_barh([(left, right - left)], (y - 0.4, 0.8), facecolors=stage_colour(stage))
            if stage not in seen_stages:
                seen_stages.append(stage)
        for t in (t for t in h.transitions if t.slot == slot and t.trigger in MOMENTS):
            # the decisive moments, visible even when the stage they enter lasts less than an epoch
            bands.scatter(x([t.epoch]), [y], s=70, marker="D", color=stage_colour(t.dest), edgecolors="black",
                          linewidths=0.8, zorder=3)
            if t.dest not in seen_stages:
                seen_stages.append(t.dest)
        _markers(bands, h, ticks=False, x=x)
    bands.set_yticks(range(len(band_rows)), [slot if len(runs) == 1 else f"{labels[i]}:{slot}"
                                             for i, slot in band_rows])
    bands.set_ylim(max(len(band_rows), 1) - 0.4, -0.6)  # the first run's slots on top
    bands.set_xlabel("epoch" if x_kind == "epoch" else "cumulative training FLOPs")
    bands.set_title("seed stage per slot (diamonds: germinate, fossilize, cull)", loc="left", fontsize=10)
    order = [s for s in SEED.state_names if s in seen_stages]
    if order:
        bands.legend(handles=[Patch(color=stage_colour(s), label=s) for s in order], loc="upper left",
                     bbox_to_anchor=(1.0, 1.0), fontsize=8, title="stage")
    loss.set_ylabel("loss")
    loss.set_title("train (dashed) and validation (solid) loss", loc="left", fontsize=10)
    metric.set_ylabel(", ".join(primaries))
    metric.set_title("primary metric", loc="left", fontsize=10)
    params.set_ylabel("parameters")
    for ax in (loss, metric, params):
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    kinds = _marker_legend(runs)
    if kinds:
        fig.legend(handles=kinds, loc="outside lower center", ncol=len(kinds), fontsize=8)
    fig.suptitle(_title(runs, labels))
    write_png(fig, out)
    return {"output": str(out), "runs": [r.run_id for r in runs], "labels": labels, "stages": order,
            "markers": sorted({m.kind for r in runs for m in r.history.markers})}


def write_png(fig: Figure, out: Path) -> None:
    """Render ``fig`` into the PNG ``out`` atomically (a temp file beside it, then a rename): a reader never sees
    half a figure, and a failed render leaves no temp file."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        FigureCanvasAgg(fig).print_png(str(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def _marker_legend(runs: list[Run]) -> list[Line2D]:
    markers = [m for r in runs for m in r.history.markers]
    handles = [Line2D([], [], color=level_colour(lvl), linestyle="--", label=f"emergency {lvl}")
               for lvl in EMERGENCY.state_names if any(m.level == lvl for m in markers)]
    if any(m.kind == "rollback" for m in markers):
        handles.append(Line2D([], [], color="black", linestyle=":", label="rollback"))
    if any(m.kind == "checkpoint" for m in markers):
        handles.append(Line2D([], [], color="dimgray", label="checkpoint (tick)"))
    return handles


def _title(runs: list[Run], labels: list[str]) -> str:
    if len(runs) == 1:
        r = runs[0]
        status = r.summary.get("status") if r.summary else None
        return f"esper run {labels[0]}" + (f" ({status})" if isinstance(status, str) else "")
    return "esper runs: " + ", ".join(labels)
