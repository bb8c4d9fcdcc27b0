"""Early stopping: the run ends once its primary metric has not improved for ``trainer.early_stop_patience``
epochs. Decided from the metrics history alone (a checkpoint holds it), so a resumed run decides as the straight
one would."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from esper.core.config import TrainerConfig
from esper.core.data import Task


def early_stop(history: Sequence[dict[str, Any]], task: Task, cfg: TrainerConfig) -> str | None:
    """Why the run stops now, or None: the last ``early_stop_patience`` epochs brought no value of the task's
    primary metric better than the best before them by more than ``early_stop_min_delta``."""
    metric, direction = task.primary_metric, task.direction
    patience, min_delta = cfg.early_stop_patience, cfg.early_stop_min_delta
    if patience <= 0:
        return None
    rows = [(int(r["epoch"]), float(r[metric])) for r in history if isinstance(r.get(metric), int | float)]
    if len(rows) <= patience:
        return None
    sign = 1.0 if direction == "max" else -1.0
    before, recent = rows[:-patience], rows[-patience:]
    best_epoch, best = max(before, key=lambda r: sign * r[1])
    if any(sign * (v - best) > min_delta for _, v in recent):
        return None
    return (f"early stop: {metric} has not improved by more than {min_delta:g} for {patience} epoch(s) "
            f"(best {best:.4f} at epoch {best_epoch})")
