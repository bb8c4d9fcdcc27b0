"""Persisted controller state and the one storage manager that owns it (checkpoints store ``to_dict()``)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from esper.core.tamiyo._util import describe
from esper.core.tamiyo.commands import Command
from esper.core.tamiyo.errors import ControllerStateError

SCHEMA = "tamiyo-state/1"

_MODEL = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class EpochMetrics(BaseModel):
    """Validation/training metrics of one epoch: the before/after points of a field report. Besides the losses,
    one ``val_<metric>`` float per task metric (``val_accuracy`` for classification), flat as in metrics.jsonl."""

    model_config = ConfigDict(frozen=True, strict=True, extra="allow", allow_inf_nan=False)
    __pydantic_extra__: dict[str, float] = Field(init=False)

    epoch: int = Field(ge=0)
    train_loss: float
    val_loss: float

    @model_validator(mode="after")
    def _val_names(self) -> EpochMetrics:
        bad = [k for k in self.model_extra or {} if not (k.startswith("val_") and k.isidentifier())]
        if bad:
            raise ValueError(f"unknown metric keys {bad}: task metrics are val_<name>")
        return self

    def metric(self, name: str) -> float:
        """``val_loss`` or a task metric by its reported name; a missing one is a KeyError naming it."""
        if name == "val_loss":
            return self.val_loss
        extra = self.model_extra or {}
        if name not in extra:
            raise KeyError(f"epoch {self.epoch} has no metric {name!r} (has {sorted(extra)})")
        return float(extra[name])


class EpochRecord(BaseModel):
    """One epoch of history: what plateau, volatility and rollback checks look back over."""

    model_config = _MODEL

    metrics: EpochMetrics
    rollbacks_total: int = Field(ge=0)


class AwaitingCommand(BaseModel):
    """A command accepted by ``decide`` that the trainer has not yet confirmed as applied or aborted."""

    model_config = _MODEL

    command: Command
    before: EpochMetrics


class ReportWindow(BaseModel):
    """An applied command whose field report is due at ``due_epoch`` (or earlier, when aborted)."""

    model_config = _MODEL

    command: Command
    before: EpochMetrics
    applied_epoch: int = Field(ge=0)
    due_epoch: int = Field(ge=0)
    aborted_reason: str | None = None


class RefusedPair(BaseModel):
    """A (slot, blueprint) germination that was refused (by the risk stage's budget, the validator, or G0 when
    applied) under ``budget``: the policy does not propose it again while the budget is the same."""

    model_config = _MODEL

    slot: str = Field(min_length=1)
    blueprint: str = Field(min_length=1)
    budget: int = Field(ge=0)
    epoch: int = Field(ge=0)
    reason: str


class ControllerState(BaseModel):
    """Everything the controller carries across epochs; JSON-able and exactly round-trippable."""

    model_config = _MODEL

    schema_version: Literal["tamiyo-state/1"] = SCHEMA
    run_id: str = Field(min_length=1)
    observed_epochs: int = Field(0, ge=0)
    last_epoch: int | None = None
    next_seq: int = Field(0, ge=0)
    history: list[EpochRecord] = Field(default_factory=list)
    # Rollback total of the newest record dropped from ``history`` (the baseline for the rollback window).
    rollbacks_before_history: int = Field(0, ge=0)
    germinations_by_blueprint: dict[str, int] = Field(default_factory=dict)
    germinations_by_slot: dict[str, int] = Field(default_factory=dict)
    regressed_blueprints: list[str] = Field(default_factory=list)
    refused: list[RefusedPair] = Field(default_factory=list)
    issued_ids: list[str] = Field(default_factory=list)
    awaiting: list[AwaitingCommand] = Field(default_factory=list)
    windows: list[ReportWindow] = Field(default_factory=list)
    reports_filed: int = Field(0, ge=0)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; a value that JSON cannot carry exactly is a ControllerStateError."""
        data = self.model_dump(mode="json")
        try:
            json.dumps(data, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ControllerStateError(f"controller state is not serialisable: {exc}") from exc
        return data

    @classmethod
    def from_dict(cls, data: Any) -> ControllerState:
        """Restore from ``to_dict()`` output; anything malformed is a ControllerStateError."""
        if not isinstance(data, dict):
            raise ControllerStateError(f"controller state must be a JSON object, got {type(data).__name__}")
        if data.get("schema_version") != SCHEMA:
            raise ControllerStateError(
                f"controller state schema {data.get('schema_version')!r} is not {SCHEMA!r}")
        try:
            # JSON mode: lists are accepted where tuples live, exactly as to_dict wrote them.
            return cls.model_validate_json(json.dumps(data, allow_nan=False))
        except (TypeError, ValueError) as exc:  # ValidationError is a ValueError
            detail = describe(exc) if isinstance(exc, ValidationError) else str(exc)
            raise ControllerStateError(f"invalid controller state: {detail}") from exc


class ControllerStateStore:
    """The one owner of a run's controller state: hands out copies, commits new versions, (de)serialises."""

    def __init__(self, run_id: str) -> None:
        self._run_id = run_id
        self._state = ControllerState(run_id=run_id)

    @property
    def run_id(self) -> str:
        return self._run_id

    def working_copy(self) -> ControllerState:
        """A deep copy to compute the next state on; the stored one only changes through ``commit``."""
        return self._state.model_copy(deep=True)

    def view(self) -> ControllerState:
        """A read-only look (a copy, so callers cannot mutate the stored state behind the store's back)."""
        return self._state.model_copy(deep=True)

    def commit(self, state: ControllerState) -> None:
        if state.run_id != self._run_id:
            raise ControllerStateError(f"state of run {state.run_id!r} committed to run {self._run_id!r}")
        self._state = state

    def to_dict(self) -> dict[str, Any]:
        return self._state.to_dict()

    def restore(self, data: Any) -> None:
        """Replace the state with a serialised one (resume); the current state is kept on any failure."""
        state = ControllerState.from_dict(data)
        if state.run_id != self._run_id:
            raise ControllerStateError(
                f"controller state belongs to run {state.run_id!r}, not {self._run_id!r}")
        self._state = state
