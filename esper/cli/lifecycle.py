"""`esper lifecycle`: the lifecycle tables, rendered from the data."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from esper.cli.common import JsonOpt, handle_errors, print_json, stdout
from esper.statemachines import TABLES
from esper.statemachines.render import to_mermaid


class Machine(StrEnum):
    seed = "seed"
    trainer = "trainer"
    emergency = "emergency"


class Format(StrEnum):
    table = "table"
    mermaid = "mermaid"
    json = "json"


@handle_errors
def lifecycle(
    machine: Annotated[Machine, typer.Argument(help="Which lifecycle.")] = Machine.seed,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Output format.")] = Format.table,
    as_json: JsonOpt = False,
) -> None:
    """Show a lifecycle (states, values, transitions, gates) as a table, mermaid diagram or JSON."""
    table = TABLES[machine.value]
    if as_json or fmt is Format.json:
        print_json(table.to_dict())
        return
    if fmt is Format.mermaid:
        typer.echo(to_mermaid(table), nl=False)
        return
    console = stdout()
    states = Table(title=f"{table.name} lifecycle: states", title_justify="left")
    # names must stay whole at 80 columns (rich would elide them with "…"); prose columns wrap instead
    for col in ("value", "state", "meaning", "exits"):
        states.add_column(col, no_wrap=col in ("value", "state"))
    for name, value, meaning in table.states:
        kind = " (initial)" if name == table.initial else " (terminal)" if name in table.terminal else ""
        states.add_row(str(value), name + kind, meaning, ", ".join(table.legal_triggers(name)) or "-")
    edges = Table(title=f"{table.name} lifecycle: transitions", title_justify="left")
    for col in ("trigger", "from", "to", "gate", "note"):
        edges.add_column(col, no_wrap=col in ("trigger", "to", "gate"))
    for e in table.edges:
        edges.add_row(e.trigger, ", ".join(e.sources), e.dest, e.gate or "-", e.note or "")
    console.print(states)
    console.print(edges)
