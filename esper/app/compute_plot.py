"""``OUT/compute.png`` of ``esper compare``: the primary metric against cumulative training FLOPs, one line per run,
one colour per variant, and a marker where each run first reaches its seed's target (``compute_target``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib import colormaps
from matplotlib.figure import Figure

from esper.app.compute_target import compute_to_target
from esper.app.views.plot import write_png

if TYPE_CHECKING:
    from esper.app.compare import Comparison

_COLOURS = colormaps["tab10"]


def render(c: Comparison, out: Path) -> None:
    """Draw the figure into ``out`` (written atomically)."""
    fig = Figure(figsize=(10.0, 6.0), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    section = compute_to_target(c) or {"per_seed": {}}
    for i, v in enumerate(c.variants):
        colour = _COLOURS(i % 10)
        for j, run in enumerate(r for r in c.runs if r.variant == v.name and r.curve):
            xs = [flops for _, flops, _, _ in run.curve]
            ys = [value for _, _, _, value in run.curve]
            ax.plot(xs, ys, color=colour, alpha=0.8, linewidth=1.2, label=v.name if j == 0 else None)
            hit = (section["per_seed"].get(str(run.seed)) or {}).get("reached", {}).get(v.name)
            if hit is not None:
                ax.scatter([hit["flops"]], [hit["value"]], color=colour, edgecolors="black", zorder=3, s=40)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel(c.primary_metric or "primary metric")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=9)
    target = "each seed's scratch final" if c.target is None else f"{c.target:g}"
    ax.set_title(f"{c.primary_metric} against training compute, seeds {', '.join(map(str, c.seeds))} "
                 f"(dots: first validation at the target, {target})", fontsize=10)
    write_png(fig, out)
