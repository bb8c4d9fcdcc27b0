"""The payload a training checkpoint carries, as typed models (S-3): the manifest validates every field it holds
before any is used, at verify and at resume.

Each model mirrors what one Stateful part writes (``esper.core.tolaria.components`` says which part writes which
key). Stage, level and trainer-state names are Literals of the lifecycle tables' own states, so a stage the table
does not have (``"HACKED"``) fails verification instead of a restore. Records that a part rebuilds with ``**``
(transitions, seed statistics, epoch statistics) forbid unknown keys; records that grow (a seed's record, a
metrics row) allow them, typed where known. Format v1 is unchanged: every field here is what Esper has always
written.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from esper.core.tamiyo import ControllerState
from esper.statemachines import EMERGENCY, SEED, TRAINER

SeedStageName = Literal[SEED.state_names]  # type: ignore[valid-type]
LevelName = Literal[EMERGENCY.state_names]  # type: ignore[valid-type]
TrainerStateName = Literal[TRAINER.state_names]  # type: ignore[valid-type]
RUN_ID = r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$"
SHA256 = r"^[0-9a-f]{64}$"

_CLOSED = ConfigDict(strict=True, extra="forbid", frozen=True)
_OPEN = ConfigDict(strict=True, extra="allow", frozen=True)


class _Transition(BaseModel):
    """One applied transition of a lifecycle (``StrictMachine``'s ``TransitionRecord``)."""

    model_config = _CLOSED

    machine: str
    subject: str
    source: str
    dest: str
    trigger: str
    reason: str
    utc: str
    monotonic_ms: float
    gate: dict[str, Any] | None = None


class SeedTransition(_Transition):
    source: SeedStageName  # type: ignore[valid-type]
    dest: SeedStageName  # type: ignore[valid-type]
    trigger: Literal[SEED.triggers]  # type: ignore[valid-type]


class LevelTransition(_Transition):
    source: LevelName  # type: ignore[valid-type]
    dest: LevelName  # type: ignore[valid-type]
    trigger: Literal[EMERGENCY.triggers]  # type: ignore[valid-type]


class SeedStatsRecord(BaseModel):
    """``kasmina.slot.SeedStats``."""

    model_config = _CLOSED

    epochs_in_stage: int = Field(ge=0)
    alpha_step: int = Field(ge=0)
    epoch_losses: list[float]
    loss_sum: float
    loss_count: int = Field(ge=0)
    latency_ms_sum: float
    counterfactual: dict[str, float]
    embargo_left: int
    # the blending epoch's telemetry sums (absent before blend telemetry: zero)
    blend_steps: int = Field(0, ge=0)
    alpha_sum: float = 0.0
    sparsity_sum: float = 0.0


class SeedRecord(BaseModel):
    """One slot's record (``SeedSlot.record()``)."""

    model_config = _OPEN

    slot: str = Field(min_length=1)
    layer: str = Field(min_length=1)
    seed_id: str | None
    blueprint: str | None
    stage: SeedStageName  # type: ignore[valid-type]
    stage_value: int
    alpha: float = Field(ge=0.0, le=1.0)
    epochs_in_stage: int = Field(ge=0)
    germinations: int = Field(ge=0)
    stats: SeedStatsRecord
    history: list[SeedTransition]

    @model_validator(mode="after")
    def _consistent(self) -> SeedRecord:
        if self.stage_value != SEED.value_of(self.stage):
            raise ValueError(f"stage_value {self.stage_value} is not the value of {self.stage} "
                             f"({SEED.value_of(self.stage)})")
        if self.history and self.history[-1].dest != self.stage:
            raise ValueError(f"the last transition ends in {self.history[-1].dest}, the record says {self.stage}")
        return self


class EmergencyRecord(BaseModel):
    """``EmergencyManager.state_dict()``."""

    model_config = _CLOSED

    level: LevelName  # type: ignore[valid-type]
    ewma: float | None
    healthy_epochs: int = Field(ge=0)
    consecutive_rollbacks: int = Field(ge=0)
    history: list[LevelTransition]


class EpochStatsRecord(BaseModel):
    """``TrainState``'s partial epoch (a mid-epoch checkpoint)."""

    model_config = _CLOSED

    loss_sum: float
    metric_sums: dict[str, float] | None = None  # the task's metrics, sample-weighted sums
    correct: int | None = Field(None, ge=0)  # before tasks (fdf50af): the accuracy's sum
    seen: int = Field(ge=0)
    steps: int = Field(ge=0)
    skipped: int = Field(ge=0)
    step_ms: list[float]

    @model_validator(mode="after")
    def _one_form(self) -> EpochStatsRecord:
        if (self.metric_sums is None) == (self.correct is None):
            raise ValueError("needs exactly one of 'metric_sums' (this format) and 'correct' (before tasks)")
        return self


class SkippedBatchRecord(BaseModel):
    """One batch left out of every replay (H-6)."""

    model_config = _CLOSED

    epoch: int = Field(ge=1)
    step: int = Field(ge=0)
    cause: str = Field(max_length=256)
    global_step: int = Field(ge=0)


class PrecisionRecord(BaseModel):
    """``tolaria.precision.Precision.state_dict()`` (manifest key ``precision``; absent before run.precision)."""

    model_config = _CLOSED

    scaler: dict[str, float | int | bool] | None  # torch.amp.GradScaler.state_dict() under fp16
    overflow_steps: int = Field(ge=0)


class ComputeRecord(BaseModel):
    """``tolaria.compute.ComputeMeter.state_dict()`` (manifest key ``compute``; absent before FLOP accounting)."""

    model_config = _CLOSED

    flops: dict[Literal["forward", "backward", "seeds", "validation"], int]
    train_seconds: float = Field(ge=0.0, allow_inf_nan=False)
    uncounted_ops: dict[str, int]

    @field_validator("flops", "uncounted_ops")
    @classmethod
    def _counts(cls, v: dict[str, int]) -> dict[str, int]:
        if len(v) > 256 or any(n < 0 or n > 2**100 or len(k) > 256 for k, n in v.items()):
            raise ValueError("counts must be non-negative, at most 256 entries, names at most 256 characters")
        return v


class AccumulationRecord(BaseModel):
    """``tolaria.accumulate.Accumulation.state_dict()``'s JSON half (manifest key ``accumulation``; its pending
    gradients, inside a window only, are in ``accumulation.safetensors``)."""

    model_config = _CLOSED

    pending: int = Field(ge=0, le=4096)
    window: int = Field(ge=0, le=1 << 40)  # the open window's first batch index in its epoch
    measured: list[float] = Field(max_length=4096)


class EmaRecord(BaseModel):
    """``tolaria.ema.WeightAverage.state_dict()``'s JSON half (manifest key ``ema``; the averages are in
    ``ema.safetensors``)."""

    model_config = _CLOSED

    updates: dict[str, int] = Field(max_length=1 << 20)


class DataRecord(BaseModel):
    """``BatchSkips.state_dict()`` (manifest key ``data``; absent before H-6)."""

    model_config = _CLOSED

    skipped: list[SkippedBatchRecord]


class MetricsRow(BaseModel):
    """One epoch's row of ``metrics.jsonl`` (tasks add ``val_<metric>`` keys)."""

    model_config = _OPEN

    epoch: int = Field(ge=1)
    global_step: int = Field(ge=0)


class OptimizerGroup(BaseModel):
    """One param group's hyperparameters and the indexes of its parameters."""

    model_config = _OPEN

    name: str | None = Field(None, min_length=1)  # the run's groups are named; a plain optimizer's (bench) not
    lr: float
    params: list[int]


class OptimizerRecord(BaseModel):
    """``tolaria.optimizer.optimizer_state``'s JSON half (its tensors are in ``optimizer.safetensors``)."""

    model_config = _CLOSED

    groups: list[OptimizerGroup]
    scalars: dict[str, dict[str, float | int | bool | None]]
    kind: str = Field(min_length=1)

    @model_validator(mode="after")
    def _indexes(self) -> OptimizerRecord:
        bad = [k for k in self.scalars if not k.isdigit()]
        if bad:
            raise ValueError(f"scalars keys must be parameter indexes, got {bad[:3]}")
        return self


class TensorSummary(BaseModel):
    """The ``tensors`` entry of one file (what inspect shows without loading a tensor)."""

    model_config = _OPEN

    count: int = Field(ge=0)
    parameters: int = Field(ge=0)
    bytes: int = Field(ge=0)
    dtypes: dict[str, int]


# The keys a checkpoint must hold to be resumed (the bench and tests write other payloads through the store).
TRAINING_KEYS = ("run_id", "reason", "epoch", "step_in_epoch", "global_step", "trainer_state", "emergency", "seeds",
                 "controller", "metrics", "history", "epoch_stats", "rollbacks", "commands", "optimizer",
                 "config_toml", "config_hash")
__all__ = ["RUN_ID", "SHA256", "TRAINING_KEYS", "AccumulationRecord", "ComputeRecord", "ControllerState",
           "EmaRecord", "DataRecord", "EmergencyRecord",
           "PrecisionRecord", "EpochStatsRecord", "MetricsRow", "OptimizerRecord", "SeedRecord", "TensorSummary",
           "TrainerStateName"]
