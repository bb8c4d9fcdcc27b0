"""`esper faults list`: the fault catalogue of SPEC §6 E-1 and the outcome each drill must observe."""

from __future__ import annotations

import typer
from rich.table import Table

from esper.cli.common import JsonOpt, handle_errors, print_json, stdout
from esper.core.config.faults import CATALOGUE

app = typer.Typer(help="The fault catalogue: injectable faults and their expected outcomes.", no_args_is_help=True)


@app.callback()
def _group() -> None:
    """Injectable faults (train --fault NAME@EPOCH[:STEP], [[faults]] in config, simulate-emergency --fault)."""


@app.command("list")
@handle_errors
def list_faults(as_json: JsonOpt = False) -> None:
    """List every fault: what it does, the level it must reach, the action, the final state and exit code."""
    if as_json:
        print_json({"faults": [f.to_dict() for f in CATALOGUE.values()]})
        return
    table = Table(title="fault catalogue", title_justify="left")
    # names must stay whole (they are typed back into --fault); prose columns wrap instead
    for col in ("fault", "what it does", "level", "action", "final state", "exit"):
        table.add_column(col, no_wrap=col in ("fault", "level", "final state", "exit"))
    for f in CATALOGUE.values():
        table.add_row(f.name, f.description, f.level, f.action, f.final_state, str(f.exit_code))
    stdout().print(table)
