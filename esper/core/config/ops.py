"""The operational sections of the config: checkpoints, rollback, emergencies, processes, telemetry, faults and
the bench (what keeps a run safe and measured, not what is trained)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from esper.core.config.base import MAX_TIMEOUT_MS, _Section
from esper.core.config.faults import CATALOGUE, parse_at, unknown_fault


class CheckpointConfig(_Section):
    model_config = ConfigDict(**_Section.model_config, serialize_by_alias=True)

    every_epochs: int = Field(1, ge=1, description="write a checkpoint every N epochs")
    keep_last: int = Field(3, ge=1, description="verified checkpoints kept on disk")
    keep_best: bool = Field(False, description="a `best` pointer beside `latest` names the checkpoint with the best "
                            "primary metric so far; it is never pruned while best (esper export RUN exports it)")
    commit_delay_ms: int = Field(0, ge=0, le=60_000, description="drills only: pause before committing a checkpoint")
    async_: bool = Field(False, alias="async", description="write periodic checkpoints on a background thread from "
                         "preallocated CPU buffers: the loop stalls only for the copy (same atomic commit and latest)")


class RollbackConfig(_Section):
    fast_sla_ms: float = Field(500.0, gt=0.0, le=MAX_TIMEOUT_MS, description="fast (in-memory) rollback SLA")
    full_sla_ms: float = Field(12000.0, gt=0.0, le=MAX_TIMEOUT_MS, description="full (checkpoint) rollback SLA")


class EmergencyConfig(_Section):
    recovery_epochs: int = Field(2, ge=1, description="healthy epochs before a policy downgrade")
    loss_explosion_factor: float = Field(10.0, gt=1.0, description="loss > factor x EWMA escalates")
    ewma_alpha: float = Field(0.1, gt=0.0, le=1.0, description="EWMA smoothing of the training loss")
    max_consecutive_rollbacks: int = Field(2, ge=1, description="rollbacks without a healthy epoch -> CONSERVATIVE")
    max_checkpoint_failures: int = Field(2, ge=1, description="failed checkpoint writes in a row -> HALT")
    slow_step_ms: float = Field(2000.0, gt=0.0, description="a step slower than this raises NOTICE")
    max_overflow_steps: int = Field(50, ge=1, le=10_000, description="fp16: overflow-skipped steps in a row before "
                                    "it is ELEVATED (no scale lowering fixes a gradient that is truly non-finite)")


class DistConfig(_Section):
    backend: Literal["auto", "gloo", "nccl"] = Field("auto", description="torch.distributed backend under torchrun; "
                                                     "auto: nccl on cuda, gloo on cpu")
    timeout_s: float = Field(300.0, gt=0.0, le=86_400.0, description="collective and rendezvous timeout (s)")


class TelemetryConfig(_Section):
    batch_size: int = Field(64, ge=1, description="events buffered before a write (CRITICAL bypasses)")
    rate_limit_per_s: int = Field(2000, ge=1, description="INFO/WARNING events per second before dropping")
    critical_retries: int = Field(3, ge=0, le=100, description="write retries for a CRITICAL event before escalation")
    tensorboard: bool = Field(False, description="also write scalars + lifecycle events to RUN/tensorboard/ "
                              "(needs the tensorboard extra); the same as \"tensorboard\" in loggers")
    loggers: list[Literal["csv", "mlflow", "tensorboard"]] = Field(
        default_factory=list, description="experiment loggers fed by the run's events: csv (RUN/csv/), mlflow "
        "(the mlflow extra), tensorboard")
    log_every_steps: int = Field(0, ge=0, description="a train.step event (loss, lr) every N optimizer steps for "
                                 "the loggers' per-step scalars; 0: per epoch only")
    mlflow_tracking_uri: str = Field("", max_length=4096, description="MLflow store (file:, sqlite:, http:); empty: "
                                     "mlruns/ beside the run directory")
    mlflow_experiment: str = Field("esper", min_length=1, max_length=256, description="MLflow experiment name")

    @field_validator("loggers")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"lists a logger twice: {v}")
        return v


# keys that change what a run reports, not what it trains: a resume may change them without --allow-config-change
# (the change is still an event, config.changed_on_resume)
REPORTING_KEYS = frozenset({"telemetry.tensorboard", "telemetry.loggers", "telemetry.log_every_steps",
                            "telemetry.mlflow_tracking_uri", "telemetry.mlflow_experiment"})


class FaultConfig(_Section):
    name: str = Field(description="a fault of `esper faults list`")
    at: str = Field(description="EPOCH[:STEP] where it fires")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if v not in CATALOGUE:
            raise ValueError(unknown_fault(v))
        return v

    @field_validator("at")
    @classmethod
    def _at(cls, v: str) -> str:
        parse_at(v)
        return v


class BenchConfig(_Section):
    warmup: int = Field(3, ge=0, description="untimed rounds before measuring")
    repeats: int = Field(7, ge=1, description="timed ABAB pairs per measurement")
    rollback_sizes: list[int] = Field(default_factory=lambda: [0, 10_000_000, 100_000_000], max_length=16,
                                      description="parameter counts for P-2 (0 = the default model)")
    checkpoint_sizes: list[int] = Field(default_factory=lambda: [0, 10_000_000, 100_000_000], max_length=16,
                                        description="parameter counts for P-3/P-4 (0 = the default model)")
    p1_host_channels: list[Annotated[int, Field(ge=1, le=4096)]] = Field(
        default_factory=lambda: [32, 64, 512, 640], max_length=16,
        description="cnn host channels per block for the P-1/cnn row (the step on a realistic host, ~1.1M "
                    "parameters on mnist1d); [] leaves the row out")
    p1_host_kernels: list[Annotated[int, Field(ge=1, le=64)]] = Field(
        default_factory=lambda: [5, 3, 3, 3], max_length=16,
        description="cnn host kernel size per block for the P-1/cnn row (one per entry of p1_host_channels)")

    @field_validator("rollback_sizes", "checkpoint_sizes")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(not 0 <= n <= 1_000_000_000 for n in v):
            raise ValueError(f"every size must be in [0, 1000000000], got {v}")
        return v

    @model_validator(mode="after")
    def _p1_host(self) -> BenchConfig:
        if len(self.p1_host_channels) != len(self.p1_host_kernels):
            raise ValueError(f"bench.p1_host_kernels needs one kernel per entry of bench.p1_host_channels "
                             f"({len(self.p1_host_channels)}), got {len(self.p1_host_kernels)}")
        return self
