"""`esper runs [DIR]`: one row per run directory under DIR (default: the config's run.output_dir) (V-3)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from esper.app.views import read
from esper.app.views.errors import ViewUsageError
from esper.app.views.status import Run, row
from esper.cli.common import ConfigOpt, JsonOpt, SetOpt, handle_errors, load_config, print_json, stderr, stdout
from esper.cli.view import eta_text, fmt


def collect(directory: Path) -> dict[str, Any]:
    """The document `esper runs --json` prints: a row per run, and every entry skipped with why."""
    candidates = [directory] if read.is_run_dir(directory) else read.entries(directory)
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    for entry in candidates:
        why = ("a symbolic link (not followed)" if entry.is_symlink() else
               "not a directory" if not entry.is_dir() else
               None if read.is_run_dir(entry) else "not a run directory (no config.toml, events.jsonl, "
                                                   "metrics.jsonl or summary.json)")
        if why is not None:
            skipped.append({"path": str(entry), "reason": why})
            continue
        try:
            rows.append(row(Run.load(entry), read.writer_alive(entry)))
        except OSError as exc:
            skipped.append({"path": str(entry), "reason": f"cannot be read: {exc}"})
    rows.sort(key=lambda r: (r["started"] or "", r["path"]))
    return {"dir": str(directory), "runs": rows, "skipped": skipped}


def _table(rows: list[dict[str, Any]]) -> Table:
    metrics = sorted({r["primary_metric"] for r in rows})
    t = Table(expand=False)
    t.add_column("run", no_wrap=True)
    for col in ("status", "epochs", f"best {'/'.join(metrics)} (epoch)", "final", "fossilized", "checkpoint",
                "started (UTC)", "duration"):
        t.add_column(col, justify="right" if col not in ("status", "checkpoint", "started (UTC)") else "left")
    for r in rows:
        ckpt = r["checkpoint_check"]
        name = Path(ckpt["path"]).name if ckpt["path"] else "-"
        cells = (r["run_id"], r["status"], f"{r['epochs_done']}/{fmt(r['epochs_planned'])}",
                 f"{fmt(r['best'])} ({r['best_epoch']})" if r["best"] is not None else "-", fmt(r["final"]),
                 fmt(r["seeds_fossilized"]), name if ckpt["ok"] else f"{name} (bad)" if ckpt["path"] else "-",
                 (r["started"] or "-")[:16].replace("T", " "),
                 eta_text(r["duration_s"]) if r["duration_s"] is not None else "-")
        t.add_row(*(Text(str(c)) for c in cells))
    return t


@handle_errors
def runs(
    ctx: typer.Context,
    directory: Annotated[Path | None, typer.Argument(help="Directory of run directories (default: run.output_dir).",
                                                     show_default=False)] = None,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the runs under DIR: status, epochs, best and final primary metric, seeds fossilized, last checkpoint."""
    if directory is None:
        directory = Path(load_config(ctx, config, sets).config.run.output_dir)
    if not directory.is_dir():
        raise ViewUsageError(f"{directory}: not a directory of runs")
    try:
        doc = collect(directory)
    except OSError as exc:
        raise ViewUsageError(f"{directory}: cannot be listed: {exc}") from exc
    if as_json:
        print_json(doc)
        return
    err = stderr()
    if doc["runs"]:
        stdout().print(_table(doc["runs"]))
    else:
        err.print(f"no runs in {directory}", highlight=False, markup=False)
    for r in doc["runs"]:
        ckpt = r["checkpoint_check"]
        for problem in r["problems"] + ([f"checkpoint: {ckpt['detail']}"] if ckpt["path"] and not ckpt["ok"] else []):
            err.print(f"{r['run_id']}: {problem}", highlight=False, markup=False)
    for s in doc["skipped"]:
        err.print(f"skipped {s['path']}: {s['reason']}", highlight=False, markup=False)
