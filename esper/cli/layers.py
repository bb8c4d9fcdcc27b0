"""`esper layers`: the host's modules, their output shapes and the slots and seeds each could take."""

from __future__ import annotations

import typer
from rich.table import Table

from esper.cli.common import ConfigOpt, JsonOpt, SetOpt, handle_errors, load_config, print_json, stdout


@handle_errors
def layers(ctx: typer.Context, config: ConfigOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """List the configured host's modules from one probe forward of a real example batch: type, output shape,
    how many times each runs per forward, the slot kind it would get, and the blueprints that fit there within
    seeds.param_budget (parameters each). Builds the task and host as `train` would; writes nothing."""
    from esper.app.layers import host_layers  # torch and the engine: this command alone pays for them

    found = host_layers(load_config(ctx, config, sets).config)
    if as_json:
        print_json(found.to_doc())
        return
    console = stdout()
    if not console.is_terminal:
        console.width = max(console.width, 200)  # a log or pipe: never squeeze names into ellipses
    table = Table(title=f"{found.host}: {found.params:,} parameters, output {found.output}; seeds.param_budget "
                  f"{found.budget:,}", title_justify="left")
    for col in ("layer", "type", "output", "runs", "slot kind", "blueprints within the budget (parameters)"):
        table.add_column(col, overflow="fold")
    for row in found.layers:
        kind = row.kind + (" (or tokens)" if row.tokens else "") if row.kind else "-"
        fits = ", ".join(f"{b} {n:,}" for b, n in row.fits.items())
        if row.why:
            fits = f"no slot: {row.why}" if not row.kind or row.runs > 1 else fits
        elif not fits and row.over:
            smallest = min(row.over, key=lambda b: row.over[b])
            fits = f"none (smallest: {smallest} {row.over[smallest]:,})"
        table.add_row(row.name, row.type, row.output, str(row.runs), kind, fits)
    console.print(table, markup=False)
