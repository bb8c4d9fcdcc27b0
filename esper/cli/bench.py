"""`esper bench`: the performance harness (SPEC §9) as a Rich table, or one JSON document."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from esper.cli.common import (
    ConfigOpt,
    JsonOpt,
    SetOpt,
    global_options,
    handle_errors,
    load_config,
    print_json,
    stderr,
    stdout,
)

ScaleOutOpt = Annotated[bool, typer.Option(
    "--scale-out", help="Only P-7: steps/s at 1 and 2 processes for the same global batch, on the configured job "
    "and on the >= 1M-parameter cnn host of P-1/cnn (real runs, minutes; --quick: one pair of 2 epochs).")]
QuickOpt = Annotated[bool, typer.Option("--quick", help="Reduced run (well under a minute) for CI smoke tests.")]


def _num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3g}"


def _goal(r: dict[str, Any]) -> str:
    goal = r["goal"]
    if goal is None:
        return "-"
    if "max_ratio" in goal:
        return f"<= {goal['max_ratio']:g}x"
    if "min_ratio" in goal:
        return f">= {goal['min_ratio']:g}x"
    return f"<= {_num(goal['max'])} {goal['unit']}"


def _met(met: bool | None) -> str:
    return "-" if met is None else "[green]yes[/]" if met else "[red]no[/]"


def results_table(doc: dict[str, Any]) -> Table:
    """measurement | baseline median | esper median | ratio | goal | met?"""
    m = doc["machine"]
    table = Table(title=f"esper bench{' --quick' if doc['quick'] else ''}: {m['cores_available']} cores, "
                        f"torch {m['torch']} ({m['torch_threads']} threads), python {m['python']}",
                  title_justify="left")
    for col in ("measurement", "baseline median", "esper median", "ratio", "goal", "met?"):
        table.add_column(col, justify="left" if col == "measurement" else "right")
    for r in doc["results"]:
        name = f"{r['id']} {r['name']}"
        if r["kind"] == "skipped":
            table.add_row(name, "-", Text(f"skipped: {r['reason']}"), "-", "-", "-")  # Text: "[bench]" stays
            continue
        unit = r["unit"]
        if r["kind"] == "speedup":
            table.add_row(name, f"{_num(r['baseline']['median'])} {unit} (1 process)",
                          f"{_num(r['esper']['median'])} {unit} (2)", f"{r['ratio']['median']:.2f}x", _goal(r),
                          _met(r["met"]))
            continue
        if r["kind"] == "ratio":
            ratio = r["ratio"]
            table.add_row(name, f"{_num(r['baseline']['median'])} {unit}", f"{_num(r['esper']['median'])} {unit}",
                          f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})", _goal(r), _met(r["met"]))
        else:
            v = r["value"]
            table.add_row(name, "-", f"{_num(v['median'])} {unit} (p99 {_num(v['p99'])}, max {_num(v['max'])})", "-",
                          _goal(r), _met(r["met"]))
    return table


@handle_errors
def bench(
    ctx: typer.Context,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    quick: QuickOpt = False,
    as_json: JsonOpt = False,
    scale_out: ScaleOutOpt = False,
) -> None:
    """Measure Esper's overheads against plain-PyTorch baselines, alternating in one process (SPEC §9)."""
    from esper.app.bench.p7 import run_p7_rows  # torch and the engine: this command alone pays for them
    from esper.app.bench.run import run_bench
    from esper.app.bench.stats import BenchPlan

    resolved = load_config(ctx, config, sets)
    if scale_out:
        with tempfile.TemporaryDirectory(prefix=".bench-p7-", dir=".") as scratch:
            rows = [r.to_dict() for r in run_p7_rows(resolved.config, Path(scratch),
                                                     BenchPlan.from_config(resolved.config.bench, quick=quick))]
        if as_json:
            print_json({"results": rows})
            return
        for row in rows:
            if row["kind"] == "skipped":
                stdout().print(f"{row['id']} skipped: {row['reason']}", highlight=False, markup=False)
                continue
            goal = "" if row["goal"] is None else (f"; goal >= {row['goal']['min_ratio']}x: "
                                                   f"{'met' if row['met'] else 'MISSED'}")
            stdout().print(f"{row['id']} {row['name']}: {row['baseline']['median']:.1f} -> "
                           f"{row['esper']['median']:.1f} steps/s, ratio {row['ratio']['median']:.2f}x (median of "
                           f"{row['size']['pairs']} pairs){goal}", highlight=False, markup=False)
        return
    plan = BenchPlan.from_config(resolved.config.bench, quick=quick)
    err = stderr()
    quiet = global_options(ctx).quiet

    def progress(msg: str) -> None:
        if not quiet:
            err.print(f"bench: {msg}", highlight=False, markup=False)

    doc = run_bench(resolved.config, plan, progress=progress)
    if as_json:
        print_json(doc)
        return
    out = stdout()
    out.print(results_table(doc))
    s = doc["summary"]
    out.print(f"goals met: {s['met']}/{s['goals']}" + (f"; missed: {', '.join(s['missed'])}" if s["missed"] else "")
              + f"  ({doc['wall_s']:.1f} s)", highlight=False)
