"""Kasmina, the seed execution layer: slots on the host, blueprints and their load manager, the seed lifecycle
with its gates G0-G5, alpha blending, gradient isolation and parameter ownership.

Facade convention (kasmina, tamiyo, tolaria alike): the package's ``__init__`` re-exports what other layers use;
code outside the package imports from here, modules inside import each other by module path.
"""

from esper.core.kasmina.blueprints import Blueprint, BlueprintRegistry, param_count
from esper.core.kasmina.gates import GateResult
from esper.core.kasmina.kasmina import Build, Kasmina, LossFn
from esper.core.kasmina.kinds import SlotShape
from esper.core.kasmina.loader import BlueprintLoadError, BlueprintLoadManager, LoaderStats
from esper.core.kasmina.ownership import OwnershipIssue, ParameterOwnership
from esper.core.kasmina.slot import LIVE, Mode, SeedForwardError, SeedSlot

__all__ = [
    "LIVE", "Blueprint", "BlueprintLoadError", "BlueprintLoadManager", "BlueprintRegistry", "Build", "GateResult",
    "Kasmina", "LoaderStats", "LossFn", "Mode", "OwnershipIssue", "ParameterOwnership", "SeedForwardError",
    "SeedSlot", "SlotShape", "param_count",
]
