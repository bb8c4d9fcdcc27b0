"""`esper eval`: a checkpoint's network on a validation set, without training: the figures the run's own
validation computes (sample-weighted means of the loss and of each metric over ``data.eval_batch_size`` batches),
from the network ``esper export`` would write. ``--set`` goes on top of the checkpoint's config (another
``data.eval_batch_size``, or another task with the same inputs and outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from esper.app.export import grown_network
from esper.core.data import val_batches


@torch.no_grad()
def evaluate_checkpoint(target: Path, *, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """``val_loss`` and ``val_<metric>`` of the checkpoint's network as the run's validation sees it (seeds still
    blending at their current alpha; a TRAINING seed adds nothing to the output), with what was evaluated."""
    grown = grown_network(target, live=True, overrides=overrides)
    task, model = grown.task, grown.model
    sums = dict.fromkeys(["loss", *task.metrics], 0.0)
    seen = 0
    for x, y in val_batches(task, grown.cfg.data):
        out = model(x)
        n = len(y)
        sums["loss"] += float(task.loss(out, y)) * n
        for name, fn in task.metrics.items():
            sums[name] += float(fn(out, y)) * n
        seen += n
    m = grown.checkpoint.manifest
    return {"checkpoint": str(grown.checkpoint.path), "run_id": m.run_id, "epoch": m.epoch, "task": task.name,
            "samples": seen, "metrics": {f"val_{k}": v / seen for k, v in sums.items()},
            "primary_metric": task.primary_metric, "seeds": [s.model_dump() for s in grown.seeds],
            "dropped": grown.dropped, "weights": "ema" if grown.averaged else "trained"}
