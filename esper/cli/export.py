"""`esper export RUN|CHECKPOINT -o DIR`: the trained network as a plain PyTorch module (safetensors + manifest)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esper.cli.common import JsonOpt, handle_errors, print_json, stdout


@handle_errors
def export(
    target: Annotated[Path, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Directory to write (must not exist, or be empty).")],
    live: Annotated[bool, typer.Option("--live", help="Keep seeds still blending at their current alpha instead "
                                                      "of refusing them.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Export the network of a verified checkpoint: the host with its FOSSILIZED seeds (DORMANT and CULLED slots
    hold none). Load it with `esper.load_model(DIR)`. A seed still mid-lifecycle is refused (exit 3) unless --live."""
    from esper.app.export import export_checkpoint  # torch and the engine: this command alone pays for them

    done = export_checkpoint(target, out, live=live)
    m = done.manifest
    if as_json:
        print_json({"out": str(done.out), **m.model_dump(exclude={"config_toml"})})
        return
    kept = ", ".join(f"{s.slot} ({s.blueprint}, {s.stage}, alpha {s.alpha:g})" for s in m.seeds) or "none"
    console = stdout()
    console.print(f"exported {m.checkpoint} (epoch {m.epoch}) to {done.out}", highlight=False, markup=False)
    console.print(f"  seeds kept: {kept}", highlight=False, markup=False)
    if m.averaged:
        console.print("  weights: the run's moving average (trainer.ema), as its validation judged them",
                      highlight=False, markup=False)
    if m.dropped:
        dropped = ", ".join(f"{k} ({v})" for k, v in m.dropped.items())
        console.print(f"  slots without a seed: {dropped}", highlight=False, markup=False)
    console.print(f'  load it: esper.load_model("{done.out}")', highlight=False, markup=False)
