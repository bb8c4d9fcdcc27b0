"""Lifecycle tables and the strict machine that runs them. Imports nothing from torch or core."""

from esper.statemachines.errors import GateRejected, IllegalTransition, LifecycleError, TableError
from esper.statemachines.machine import StrictMachine, TransitionRecord
from esper.statemachines.table import Edge, LifecycleTable, validate
from esper.statemachines.tables import (
    EMERGENCY,
    ESCALATE_TRIGGER,
    SEED,
    SEED_LIVE,
    TABLES,
    TRAINER,
    EmergencyLevel,
    SeedStage,
    TrainerState,
)

__all__ = [
    "EMERGENCY", "ESCALATE_TRIGGER", "SEED", "SEED_LIVE", "TABLES", "TRAINER", "Edge", "EmergencyLevel", "GateRejected",
    "IllegalTransition", "LifecycleError", "LifecycleTable", "SeedStage", "StrictMachine", "TableError",
    "TrainerState", "TransitionRecord", "validate",
]
