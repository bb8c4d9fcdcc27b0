"""The scalars of an epoch's metrics row, as every logger records them (CSV, MLflow, TensorBoard)."""

from __future__ import annotations

from typing import Any

# nested records of a row, not scalars
NOT_SCALARS = frozenset({"seeds_by_stage", "commands", "emergency_level", "slots", "blend"})


def scalars(row: dict[str, Any]) -> dict[str, int | float]:
    """The numeric entries of an epoch's row (not its nested records), integers kept whole (FLOPs, steps)."""
    return {k: v for k, v in row.items()
            if k not in NOT_SCALARS and not isinstance(v, bool) and isinstance(v, int | float)}
