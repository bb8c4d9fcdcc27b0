"""`esper eval RUN|CHECKPOINT`: a checkpoint's network on the validation set, without training."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from esper.cli.common import JsonOpt, SetOpt, handle_errors, print_json, stdout


@handle_errors
def evaluate(
    target: Annotated[Path, typer.Argument(help="A run directory (its latest checkpoint) or a checkpoint directory.")],
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate a verified checkpoint's network as the run's own validation sees it (FOSSILIZED seeds, and seeds
    blending at their current alpha) on its task's validation set: val_loss and every metric. --set goes on the
    checkpoint's config."""
    from esper.app.evaluate import evaluate_checkpoint  # torch and the engine: this command alone pays for them

    doc = evaluate_checkpoint(target, overrides=list(sets or []))
    if as_json:
        print_json(doc)
        return
    console = stdout()
    shown = "  ".join(f"{k}={v:.4f}" for k, v in doc["metrics"].items())
    console.print(f"{doc['checkpoint']} (epoch {doc['epoch']}) on {doc['task']}, {doc['samples']} validation "
                  f"samples: {shown}" + (" (the weights' moving average, trainer.ema)" if doc["weights"] == "ema"
                                         else ""), highlight=False, markup=False)
