"""`esper simulate-emergency`: a drill run with one injected fault or forced level (E-2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from esper.cli.common import ConfigOpt, JsonOpt, SetOpt, global_options, handle_errors, print_json, stdout
from esper.core import config as config_mod
from esper.core.errors import ExitCode


@handle_errors
def simulate_emergency(
    ctx: typer.Context,
    fault: Annotated[str | None, typer.Option("--fault", help="Fault to inject (see `esper faults list`).")] = None,
    level: Annotated[str | None, typer.Option("--level", help="Force a level: notice|elevated|conservative|halt.")
                     ] = None,
    at: Annotated[str | None, typer.Option("--at", help="EPOCH[:STEP] where it fires.")] = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Run directory (default: a temp dir).")] = None,
    synthetic: Annotated[bool, typer.Option("--synthetic", help="Drill a small synthetic job on the built-in mlp "
                                            "instead of the config's model and task (seconds).")] = False,
    config: ConfigOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run a short drill, inject a fault (or force a level) and check the outcome against the catalogue.

    The drill trains the config file's own model on its own task, with a short run on top (6 epochs, a seed that
    germinates after the first), then applies --set; --synthetic swaps in a small synthetic job on the built-in
    mlp. Exits 0 when the outcome matched the catalogue, 7 when not.
    """
    from esper.app.drill import (  # torch and the engine: this command alone pays for them
        check_drill,
        drill_config,
        run_drill,
    )

    check_drill(fault=fault, level=level, at=at)  # a bad option is a usage error before anything is read
    g = global_options(ctx)
    base = config_mod.load(config or g.config).config  # the file alone: --set goes on top of the drill defaults
    cfg = drill_config(base, [*g.sets, *(sets or [])], synthetic=synthetic)
    doc = run_drill(cfg, fault=fault, level=level, at=at, run_dir=run_dir, synthetic=synthetic)
    if as_json:
        print_json(doc)
    else:
        render(doc)
    raise typer.Exit(int(ExitCode.OK if doc["matched"] else ExitCode.EXPECTATION))


def render(doc: dict[str, Any]) -> None:
    console = stdout()
    what = doc["fault"] or f"forced level {doc['level_forced']}"
    table = Table(title=f"drill: {what} at {doc['at']}", title_justify="left", show_header=False)
    table.add_column("field")
    table.add_column("value")
    det = doc["detected"]
    rb = doc["rollback"]
    model = doc["model"]
    whose = "the synthetic drill job (--synthetic)" if model["source"] == "synthetic" else "the config's model"
    rows = [
        ("model", f"host {model['host']} on task {model['task']}, slots {', '.join(model['slots']) or '-'} "
                  f"({whose})"),
        ("detected", f"epoch {det['epoch']}, global step {det['global_step']} ({det['event']})" if det else "-"),
        ("level reached", f"{doc['level_reached']} (expected {doc['expected']['level']})"),
        ("actions", ", ".join(doc["actions"]) or "-"),
        ("rollback", f"{rb['tier']} tier, {rb['latency_ms']:.1f} ms vs SLA {rb['sla_ms']:.0f} ms "
                     f"({'ok' if rb['within_sla'] else 'MISSED'})" if rb else "-"),
        ("final state", f"{doc['final_state']} (expected {doc['expected']['final_state']}), exit {doc['exit_code']}"),
        ("last checkpoint", f"{doc['checkpoint']['path']} ({'verifies' if doc['checkpoint']['verified'] else 'BAD'})"),
        ("run directory", doc["run_dir"]),
        ("matched", Text("yes", style="green") if doc["matched"] else
         Text.assemble(("no", "red"), ": " + "; ".join(doc["mismatches"]))),
    ]
    for k, v in rows:
        table.add_row(k, v if isinstance(v, Text) else Text(v))
    console.print(table)
