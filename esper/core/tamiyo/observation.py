"""What the controller sees each epoch. Every metric is required and finite: nothing is zero-filled."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esper.core.config import KIND_RANK, KINDS
from esper.core.tamiyo._util import describe
from esper.core.tamiyo.errors import ObservationError
from esper.statemachines import SEED, SEED_LIVE

# Stages in which a seed is alive (counts against seeds.max_active).
ALIVE_STAGES: frozenset[str] = SEED_LIVE
# Stages whose slot must name the blueprint it holds (a missing blueprint id is a broken observation).
_HOLDS_SEED: frozenset[str] = ALIVE_STAGES | {"FOSSILIZED", "CULLED"}

_STRICT = ConfigDict(frozen=True, strict=True, extra="forbid", allow_inf_nan=False)


class SlotView(BaseModel):
    """One slot as Kasmina reports it.

    ``kind`` and ``shape`` (one sample's activation, no batch axis) describe the slot; ``compatible`` lists
    the blueprints of ``seeds.blueprints`` that accept it (the only ones a policy may propose there);
    ``candidate_params`` maps each of them to the parameter count it would have in this slot (the risk
    stage's parameter budget needs it for a germination); ``counterfactual_gain`` is the validation loss
    without the seed minus with it, measured while PROBATIONARY.
    """

    model_config = _STRICT

    name: str = Field(min_length=1)
    kind: str
    shape: tuple[int, ...] = Field(strict=False)
    compatible: tuple[str, ...] = Field(strict=False)
    stage: str
    blueprint: str | None
    epochs_in_stage: int = Field(ge=0)
    alpha: float = Field(ge=0.0, le=1.0)
    seed_loss_improvement: float | None
    counterfactual_gain: float | None
    candidate_params: dict[str, int]

    @field_validator("stage")
    @classmethod
    def _stage(cls, v: str) -> str:
        if v not in SEED.state_names:
            raise ValueError(f"unknown seed stage {v!r} (known: {', '.join(SEED.state_names)})")
        return v

    @field_validator("kind")
    @classmethod
    def _kind(cls, v: str) -> str:
        if v not in KINDS:
            raise ValueError(f"unknown activation kind {v!r} (known: {', '.join(KINDS)})")
        return v

    @field_validator("candidate_params")
    @classmethod
    def _params(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 0}
        if bad:
            raise ValueError(f"negative parameter counts {bad}")
        return v

    @model_validator(mode="after")
    def _blueprint(self) -> SlotView:
        if self.stage in _HOLDS_SEED and not self.blueprint:
            raise ValueError(f"slot {self.name!r} in stage {self.stage} has no blueprint id")
        if len(self.shape) != KIND_RANK[self.kind] or any(d < 1 for d in self.shape):
            raise ValueError(f"slot {self.name!r}: shape {list(self.shape)} is not a {self.kind} activation "
                             f"(one sample's shape has {KIND_RANK[self.kind]} positive axes)")
        return self

    @property
    def alive(self) -> bool:
        return self.stage in ALIVE_STAGES


class Observation(BaseModel):
    """The end-of-epoch observation; ``rollbacks_total`` counts rollbacks since the run started."""

    model_config = _STRICT

    run_id: str = Field(min_length=1)
    epoch: int = Field(ge=0)
    train_loss: float
    val_loss: float
    # every task metric on the validation set by its reported name (val_accuracy, ...), and which one is primary
    # (a key of val_metrics, or val_loss) with the direction in which it improves
    val_metrics: dict[str, float]
    primary_metric: str
    direction: Literal["max", "min"]
    step_latency_ms: float = Field(ge=0.0)
    rollbacks_total: int = Field(ge=0)
    total_params: int = Field(ge=0)
    slots: tuple[SlotView, ...] = Field(strict=False)

    @model_validator(mode="after")
    def _unique(self) -> Observation:
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate slot names {names}")
        bad = [k for k in self.val_metrics if k == "val_loss" or not (k.startswith("val_") and k.isidentifier())]
        if bad:
            raise ValueError(f"val_metrics keys must be val_<name> other than val_loss, got {bad}")
        if self.primary_metric != "val_loss" and self.primary_metric not in self.val_metrics:
            raise ValueError(f"primary_metric {self.primary_metric!r} is neither val_loss nor one of "
                             f"{sorted(self.val_metrics)}")
        return self

    def metric(self, name: str) -> float:
        return self.val_loss if name == "val_loss" else self.val_metrics[name]

    def slot(self, name: str) -> SlotView:
        for s in self.slots:
            if s.name == name:
                return s
        raise ObservationError(f"observation of epoch {self.epoch} has no slot {name!r}")

    @property
    def stages(self) -> dict[str, str]:
        return {s.name: s.stage for s in self.slots}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> Observation:
        """Validate an observation; a missing/non-finite metric or an unknown stage is an ObservationError."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ObservationError(f"broken observation: {describe(exc)}") from exc
