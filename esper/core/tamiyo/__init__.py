"""Tamiyo, the strategic controller: observation in, validated and risk-gated commands out, field reports
later.

Pure Python on purpose (no torch import): decisions may run in a worker process (``worker``: the controller the
process builds; ``pipe``: that process's end of the mediator's pipe).

Facade convention (kasmina, tamiyo, tolaria alike): the package's ``__init__`` re-exports what other layers use;
code outside the package imports from here, modules inside import each other by module path.
"""

from esper.core.tamiyo import pipe, worker
from esper.core.tamiyo.commands import Command, command_id
from esper.core.tamiyo.controller import Decision, Rejection, Tamiyo
from esper.core.tamiyo.errors import (
    ControllerStateError,
    FieldReportError,
    FieldReportLogMissing,
    FieldReportLogUnreadable,
    ObservationError,
    TamiyoError,
)
from esper.core.tamiyo.observation import ALIVE_STAGES, Observation, SlotView
from esper.core.tamiyo.policy import HeuristicPolicy, Policy, Proposal, build_policy
from esper.core.tamiyo.reports import (
    FILENAME,
    FieldReport,
    FieldReportLog,
    Outcome,
    ReadProblem,
    classify,
    prune,
    read_reports,
)
from esper.core.tamiyo.risk import RiskHistory, RiskStage, RiskVerdict
from esper.core.tamiyo.state import ControllerState, ControllerStateStore, EpochMetrics
from esper.core.tamiyo.validator import ValidationContext, ValidationResult, validate

__all__ = [
    "ALIVE_STAGES", "FILENAME", "Command", "ControllerState", "ControllerStateError", "ControllerStateStore",
    "Decision", "EpochMetrics", "FieldReport", "FieldReportError", "FieldReportLog", "FieldReportLogMissing",
    "FieldReportLogUnreadable",
    "HeuristicPolicy", "ObservationError", "Observation", "Outcome", "Policy", "Proposal", "ReadProblem",
    "Rejection", "RiskHistory", "RiskStage", "RiskVerdict", "SlotView", "Tamiyo", "TamiyoError",
    "ValidationContext", "ValidationResult", "build_policy", "classify", "command_id", "prune",
    "pipe", "read_reports", "validate", "worker",
]
