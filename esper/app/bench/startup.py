"""P-8: how long the `esper` CLI takes to start and answer, for the commands that need no torch (issue 27): each
a fresh interpreter, as an operator's shell starts it, against the interpreter importing the CLI framework alone."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from esper.app.bench.stats import BenchError, BenchPlan, Comparison, alternate

# what any Typer CLI pays before its first line: the interpreter, typer and rich
BASELINE = [sys.executable, "-c", "import typer, rich.console"]
COMMANDS = {"--version": ["--version"], "runs": ["runs", "{scratch}"], "lifecycle": ["lifecycle", "seed"]}
GOAL_S = 1.0  # "well under a second on an idle machine": the figure the README states


def _wall(argv: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, timeout=120, check=False)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv[2:])} exited {done.returncode}: {done.stderr.decode()[-500:]}")
    return wall


def run_p8(scratch: Path, plan: BenchPlan) -> list[Comparison]:
    """One row per command: its wall time from exec to exit, against ``BASELINE`` in alternating pairs; the goal
    (every sample under ``GOAL_S``) is in ``extra``, the ratio says what Esper adds to a bare Typer CLI."""
    empty = scratch / "p8-runs"
    empty.mkdir(exist_ok=True)
    rows = []
    for name, args in COMMANDS.items():
        argv = [sys.executable, "-m", "esper", *(a.replace("{scratch}", str(empty)) for a in args)]
        base, mine = alternate(lambda: _wall(BASELINE, scratch), lambda a=argv: _wall(a, scratch),
                               warmup=plan.warmup, repeats=plan.repeats)
        row = Comparison(f"P-8/{name}", f"`esper {' '.join(args[:1])}` start-up", "s", "python + typer + rich",
                         f"esper {args[0]}", base, mine, None,
                         extra={"worst_s": max(mine), "goal_s": GOAL_S, "under_goal": max(mine) < GOAL_S})
        rows.append(row)
    return rows
