"""`esper reports RUN`: summary of a run's field reports (T-12)."""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from esper.app.views.read import read_summary
from esper.cli.common import JsonOpt, handle_errors, print_json, stdout
from esper.core.tamiyo import (
    FILENAME,
    FieldReport,
    FieldReportLogMissing,
    FieldReportLogUnreadable,
    Outcome,
    ReadProblem,
    read_reports,
)

_OUTCOMES = [o.value for o in Outcome]
RUN_MARKERS = ("config.toml", "events.jsonl", "checkpoints", FILENAME)


def summarise(run: Path, reports: list[FieldReport], problems: list[ReadProblem]) -> dict[str, Any]:
    """The JSON document `esper reports --json` prints."""
    by_blueprint: dict[str, Counter[str]] = defaultdict(Counter)
    by_slot: dict[str, Counter[str]] = defaultdict(Counter)
    for r in reports:
        by_blueprint[r.blueprint or "-"][r.outcome.value] += 1
        by_slot[r.slot][r.outcome.value] += 1

    def table(counts: dict[str, Counter[str]]) -> dict[str, dict[str, int]]:
        return {k: {o: counts[k][o] for o in _OUTCOMES} for k in sorted(counts)}

    def brief(r: FieldReport) -> dict[str, Any]:
        return {"report_id": r.report_id, "command_id": r.command_id, "kind": r.kind, "slot": r.slot,
                "blueprint": r.blueprint, "reason": r.outcome_reason}

    return {
        "run": str(run),
        "file": str(run / FILENAME),
        "reports": len(reports),
        "outcomes": {o: sum(1 for r in reports if r.outcome.value == o) for o in _OUTCOMES},
        "by_blueprint": table(by_blueprint),
        "by_slot": table(by_slot),
        "regressions": [brief(r) for r in reports if r.outcome is Outcome.REGRESSION],
        "aborted": [brief(r) for r in reports if r.outcome is Outcome.ABORTED],
        "skipped": [p.to_dict() for p in problems],
        "records": [r.to_dict() for r in reports],
    }


def _counts_table(title: str, key: str, counts: dict[str, dict[str, int]]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(key)
    for o in _OUTCOMES:
        t.add_column(o, justify="right")
    for name, row in counts.items():
        t.add_row(name, *(str(row[o]) for o in _OUTCOMES))
    return t


@handle_errors
def reports(
    run: Annotated[Path, typer.Argument(help="Run directory holding field_reports.jsonl.")],
    as_json: JsonOpt = False,
) -> None:
    """Summarise a run's field reports: outcomes per blueprint and slot, regressions, skipped records."""
    try:
        is_run = run.is_dir() and any(os.path.lexists(run / name) for name in RUN_MARKERS)
    except OSError as exc:  # another user's run directory: not ours to list
        raise FieldReportLogUnreadable(f"{run}: cannot be read: {exc.strerror or exc}") from None
    if not is_run:
        raise FieldReportLogMissing(f"{run} is not a run directory (it holds none of {', '.join(RUN_MARKERS)})")
    # a run whose controller never filed a report (no commands applied yet, or seeds disabled) has none: 0 reports
    found, problems = read_reports(run / FILENAME) if os.path.lexists(run / FILENAME) else ([], [])
    doc = summarise(run, found, problems)
    summary, _ = read_summary(run)  # a damaged summary is the views' to report; here it only lacks the why
    growth = summary.get("growth") if isinstance(summary, dict) else None
    warning = growth.get("warning") if isinstance(growth, dict) else None
    doc["growth_warning"] = warning if isinstance(warning, str) else None
    if as_json:
        print_json(doc)
        return
    console = stdout()
    totals = ", ".join(f"{o} {n}" for o, n in doc["outcomes"].items())
    console.print(f"{doc['reports']} field reports in {doc['file']}: {totals}", highlight=False)
    if doc["growth_warning"]:
        console.print(f"why: {doc['growth_warning']}", highlight=False, markup=False)
    if found:
        console.print(_counts_table("outcomes per blueprint", "blueprint", doc["by_blueprint"]))
        console.print(_counts_table("outcomes per slot", "slot", doc["by_slot"]))
    for title, rows in (("regressions", doc["regressions"]), ("aborted", doc["aborted"])):
        if rows:
            t = Table(title=title, title_justify="left")
            for col in ("command", "kind", "slot", "blueprint", "why"):
                t.add_column(col)
            for row in rows:
                t.add_row(row["command_id"], row["kind"], row["slot"], row["blueprint"] or "-", row["reason"])
            console.print(t)
    if problems:
        t = Table(title="skipped records (damaged or rejected)", title_justify="left")
        for col in ("line", "problem", "report", "detail"):
            t.add_column(col)
        for p in problems:
            t.add_row(str(p.line), p.kind, p.report_id or "-", p.detail)
        console.print(t)
