"""The one typed configuration: schema, resolution, ``--set`` overrides and readable errors.

Every default lives in this schema, once. ``esper.toml`` at the repository root documents each key.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w
from pydantic import Field, field_validator, model_validator

from esper.core.config.base import (
    _NAME,
    CODE,
    MAX_TIMEOUT_MS,
    PATH,
    _Section,
    count_or_percentage,
    is_factory_ref,
    share,
)
from esper.core.config.ops import (
    BenchConfig,
    CheckpointConfig,
    DistConfig,
    EmergencyConfig,
    FaultConfig,
    RollbackConfig,
    TelemetryConfig,
)
from esper.core.io import bounded

ENV_VAR = "ESPER_CONFIG"
DEFAULT_PATH = Path("esper.toml")


class RunConfig(_Section):
    # TOML integers are signed 64-bit; seeds derived from it are wrapped into torch's range (rng.derive)
    seed: int = Field(42, ge=0, le=2**63 - 1,
                      description="global RNG seed; a CPU run is bit-reproducible for a given seed")
    output_dir: str = Field("runs", min_length=1, max_length=4096, description="parent directory of run directories",
                            json_schema_extra=PATH)
    run_id: str = Field("", pattern=r"^([A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?$",
                        description="run id; empty generates one")
    device: str = Field("cpu", pattern=r"^(cpu|cuda|cuda:[0-9]{1,3}|mps)$",
                        description="cpu | cuda | cuda:N | mps; one torch cannot use is exit 3, never a fallback")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="autocast dtype of the forward passes; fp16 adds a loss scaler (skipped steps counted)")
    threads: int = Field(0, ge=0, le=256, description="torch intra-op threads; 0 keeps torch's default")


BUILTIN_TASKS = ("mnist1d", "digits", "digits_images", "synthetic", "chars")


class DataConfig(_Section):
    task: str = Field("digits", description="mnist1d | digits | digits_images | synthetic | chars | module:function",
                      json_schema_extra=CODE)
    block_size: int = Field(64, ge=2, le=4096, description="chars task: characters per training window")
    batch_size: int = Field(64, ge=1, le=65536, description="training mini-batch size")
    eval_batch_size: int = Field(512, ge=1, le=65536,
                                 description="validation batch size (no gradients kept: larger than batch_size)")
    drop_last: bool = Field(True, description="drop each epoch's incomplete last batch (its loss is noisy)")
    num_workers: int = Field(0, ge=0, le=64, description="DataLoader worker processes; 0 loads in the trainer")
    pin_memory: bool = Field(False, description="page-lock batches for faster copies to a CUDA device (no effect "
                                                "on cpu)")
    val_fraction: float = Field(0.25, gt=0.0, lt=1.0, description="held-out fraction for validation (digits, "
                                                                  "digits_images, synthetic)")
    synthetic_samples: int = Field(512, ge=16, le=10_000_000, description="synthetic task: number of samples")
    synthetic_features: int = Field(16, ge=2, le=100_000, description="synthetic task: input features")
    synthetic_classes: int = Field(4, ge=2, le=100_000, description="synthetic task: classes")

    @field_validator("task")
    @classmethod
    def _task(cls, v: str) -> str:
        if v in BUILTIN_TASKS or is_factory_ref(v):
            return v
        raise ValueError(f"must be one of {', '.join(BUILTIN_TASKS)} or 'module:function', got {v!r}")


HOSTS = ("mlp", "cnn", "transformer")
# What a slot's layer outputs (H-1): features [N, D], channels1d [N, C, L], channels2d [N, C, H, W], tokens [N, T, D];
# "auto" infers the kind from the rank.
SlotKind = Literal["auto", "features", "channels1d", "channels2d", "tokens"]
KINDS: tuple[str, ...] = get_args(SlotKind)[1:]
# rank of one sample's activation (no batch axis) for each kind; "auto" picks the first kind of a rank
KIND_RANK: dict[str, int] = {"features": 1, "channels1d": 2, "channels2d": 3, "tokens": 2}
assert tuple(KIND_RANK) == KINDS


class HostConfig(_Section):
    factory: str = Field("mlp", description="mlp | cnn | transformer | module:function", json_schema_extra=CODE)
    hidden: list[int] = Field(default_factory=lambda: [6, 6], min_length=1, max_length=64,
                              description="hidden widths of the built-in MLP host; layers are hidden1..N")
    activation: Literal["relu", "gelu", "tanh"] = Field("relu", description="activation of the built-in hosts")
    channels: list[int] = Field(default_factory=lambda: [6, 6, 6], min_length=1, max_length=64,
                                description="cnn host: output channels per conv block; blocks are conv1..N")
    kernels: list[int] = Field(default_factory=lambda: [5, 3, 3], min_length=1, max_length=64,
                               description="cnn host: kernel size per conv block (one per entry of channels)")
    stride: int = Field(2, ge=1, le=64, description="cnn host: stride of every conv block")
    padding: int = Field(1, ge=0, le=64, description="cnn host: zero padding of every conv block")
    norm: Literal["none", "batch", "group"] = Field(
        "none", description="cnn host: normalisation after each conv (BatchNorm, or GroupNorm of up to 4 groups)")
    output: str | int = Field(
        "", description="which part of a non-tensor host output to train on: a key or attribute (\"logits\" of a "
        "Hugging Face ModelOutput or a dict) or a tuple index (0); \"\" when the host returns a tensor")
    d_model: int = Field(64, ge=1, le=8192, description="transformer host: embedding width")
    n_layers: int = Field(1, ge=1, le=64, description="transformer host: blocks, named block1..N")
    n_heads: int = Field(4, ge=1, le=256, description="transformer host: attention heads (divide d_model)")
    mlp_ratio: int = Field(4, ge=1, le=16, description="transformer host: MLP hidden width / d_model")
    dropout: float = Field(0.0, ge=0.0, lt=1.0,
                           description="dropout: transformer host after attention and MLP; cnn host after each block")

    @field_validator("factory")
    @classmethod
    def _factory(cls, v: str) -> str:
        if v in HOSTS or is_factory_ref(v):
            return v
        raise ValueError(f"must be 'mlp', 'cnn', 'transformer' or 'module:function', got {v!r}")

    @field_validator("output")
    @classmethod
    def _output(cls, v: str | int) -> str | int:
        if isinstance(v, bool) or (isinstance(v, str) and (len(v) > 128 or not (v == "" or v.isidentifier()))):
            raise ValueError("must be a key or attribute name (\"logits\"), a tuple index (0), or \"\"")
        if isinstance(v, int) and not -64 <= v < 64:
            raise ValueError(f"a tuple index lies in [-64, 64), got {v}")
        return v

    @field_validator("hidden", "channels")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(w < 1 for w in v):
            raise ValueError(f"every width must be >= 1, got {v}")
        if any(w > 65536 for w in v):
            raise ValueError(f"every width must be <= 65536, got {v}")
        return v

    @field_validator("kernels")
    @classmethod
    def _kernels(cls, v: list[int]) -> list[int]:
        if any(not 1 <= k <= 64 for k in v):
            raise ValueError(f"every kernel size must lie in [1, 64], got {v}")
        return v

    @model_validator(mode="after")
    def _blocks(self) -> HostConfig:
        if len(self.kernels) != len(self.channels):
            raise ValueError(f"kernels has {len(self.kernels)} entries but channels has {len(self.channels)}: "
                             "one kernel size per conv block")
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self


class SlotConfig(_Section):
    name: str = Field(pattern=_NAME, description="slot name")
    layer: str = Field(min_length=1, max_length=256, description="host layer whose output the slot augments")
    kind: SlotKind = Field(
        "auto", description="activation kind: auto infers it from the rank ([N, C, L] is channels1d)")


class BlendConfig(_Section):
    mode: Literal["convex", "residual", "channel", "confidence"] = Field("convex", description="blend mode")
    steps: int = Field(40, ge=1, le=10_000_000, description="optimizer steps for alpha to ramp 0 -> 1")
    channel_alpha: list[float] = Field(default_factory=list, max_length=1_000_000,
                                       description="per-channel weights (channel mode)")
    confidence_margin: float = Field(0.5, gt=0.0, description="confidence mode: logit margin for full gate")


class DistillConfig(_Section):
    enabled: bool = Field(False, description="a TRAINING seed's own loss adds KL to the host's detached output")
    temperature: float = Field(2.0, gt=0.0, le=100.0, description="softmax temperature of the KL term")
    weight: float = Field(0.5, ge=0.0, le=100.0, description="weight of the KL term (times temperature^2)")


class SeedsConfig(_Section):
    enabled: bool = Field(True, description="grow seeds at all; false trains the host alone")
    slots: list[SlotConfig] = Field(
        default_factory=lambda: [SlotConfig(name="s1", layer="hidden1"), SlotConfig(name="s2", layer="hidden2")],
        max_length=64, description="slots at named host layers",
    )
    blueprints: list[str] = Field(default_factory=lambda: ["residual_mlp", "lowrank", "gated"],
                                  min_length=1, max_length=256, description="blueprints the controller may germinate")
    user_blueprints: dict[str, str] = Field(default_factory=dict, max_length=256, description="name -> module:function",
                                            json_schema_extra=CODE)
    max_active: int = Field(2, ge=1, description="seeds alive (not DORMANT/FOSSILIZED/retired) at once")
    param_budget: int | str = Field(
        20000, description="max parameters of one seed (G0): a count, or a share of the host's parameters (\"5%\")")
    min_training_epochs: int = Field(2, ge=1, description="epochs in TRAINING before G2 may pass")
    g2_min_improvement: float = Field(0.02, ge=0.0, description="relative drop of the seed's own loss for G2")
    skip_training: bool = Field(False, description="a seed copied from the host's trained layer (layer_copy, "
                                "layer_stack) goes from TRAINING straight to BLENDING (G2 recorded as skipped): "
                                "it needs no isolated training, and that costs compute")
    max_step_latency_ms: float = Field(1000.0, gt=0.0, description="G2 budget for the seed's step latency")
    shadowing_epochs: int = Field(1, ge=1, description="epochs in SHADOWING")
    probation_epochs: int = Field(1, ge=1, description="epochs in PROBATIONARY before G4 is asked")
    embargo_epochs: int = Field(2, ge=0, description="epochs a slot cools down after a cull")
    isolation_sample: int = Field(4096, ge=16, le=10_000_000,
                                  description="gradient entries sampled by the isolation monitor")
    isolation_max_cosine: float = Field(1e-6, ge=0.0, description="largest host/seed gradient cosine (G1)")
    blend: BlendConfig = Field(default_factory=BlendConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    compile: bool = Field(False, description="torch.compile blueprints on load; a failure rejects the germination")
    cache_bytes: int = Field(64 * 2**20, ge=0, description="blueprint load cache bound in bytes")
    prefetch_workers: int = Field(2, ge=1, le=32, description="concurrent blueprint prefetches")
    load_timeout_ms: int = Field(5000, ge=1, le=MAX_TIMEOUT_MS,
                                 description="budget of one blueprint load (torch.compile time not counted)")
    compile_timeout_ms: int = Field(600_000, ge=1, le=MAX_TIMEOUT_MS,
                                    description="budget of torch.compile for one blueprint (seeds.compile)")

    @field_validator("param_budget")
    @classmethod
    def _budget(cls, v: int | str) -> int | str:
        return count_or_percentage(v, "a parameter count", "a percentage of the host's parameters in (0%, 1000%]",
                                   lambda pct: 0 < pct <= 1000, "5%")

    def budget_for(self, host_params: int) -> int:
        """The budget in parameters for a host of ``host_params`` (a percentage rounds down, at least 1)."""
        if isinstance(self.param_budget, int):
            return self.param_budget
        return max(1, int(host_params * share(self.param_budget)))

    @property
    def budget(self) -> int:
        """The absolute budget; a relative one must have been resolved against the host first (the builder
        does, before any part reads it)."""
        if not isinstance(self.param_budget, int):
            raise ValueError(f"seeds.param_budget {self.param_budget!r} is relative: resolve it with budget_for()")
        return self.param_budget

    @model_validator(mode="after")
    def _check(self) -> SeedsConfig:
        names = [s.name for s in self.slots]
        if len(set(names)) != len(names):
            raise ValueError(f"slot names must be unique, got {names}")
        for name, ref in self.user_blueprints.items():
            if not re.match(_NAME, name):
                raise ValueError(f"user_blueprints: name {bounded.clip(name, 40)!r} must match {_NAME}")
            if not is_factory_ref(ref):
                raise ValueError(f"user_blueprints.{name} must be 'module:function', got {ref!r}")
        if self.blend.mode == "channel" and not self.blend.channel_alpha:
            raise ValueError("blend.mode = 'channel' requires blend.channel_alpha")
        return self


class RiskConfig(_Section):
    max_loss_volatility: float = Field(0.5, gt=0.0, description="max coefficient of variation of recent val loss")
    volatility_window: int = Field(3, ge=2, description="epochs in the volatility window")
    max_step_latency_ms: float = Field(1000.0, gt=0.0, description="defer germination above this step latency")
    max_recent_rollbacks: int = Field(0, ge=0, description="reject mutations after more rollbacks than this")
    rollback_window_epochs: int = Field(3, ge=1, description="epochs that count as 'recent' for rollbacks")


def _grow_epoch(v: int | str) -> int | str:
    return count_or_percentage(v, "an epoch", "a percentage of trainer.epochs in (0%, 100%)",
                               lambda pct: 0 < pct < 100, "10%")


def _epoch_of(at: int | str, epochs: int) -> int:
    if isinstance(at, int):
        return at
    return max(1, math.ceil(epochs * share(at)))


class ControllerConfig(_Section):
    policy: str = Field("heuristic", description="heuristic | module:function", json_schema_extra=CODE)
    timeout_ms: int = Field(2000, ge=1, le=MAX_TIMEOUT_MS,
                            description="budget of one controller decision (worker start-up not counted)")
    start_timeout_ms: int = Field(30_000, ge=1, le=MAX_TIMEOUT_MS,
                                  description="process isolation: how long the worker may take to start (import "
                                  "torch, build the policy) before that is a controller timeout")
    isolation: Literal["process", "inline"] = Field(
        "process", description="process: decisions run in a worker the mediator can kill; inline: in-process")
    plateau_window: int = Field(2, ge=1, description="epochs compared to detect a validation-loss plateau")
    plateau_min_delta: float = Field(0.02, ge=0.0, description="relative improvement below which loss plateaus")
    warmup_epochs: int = Field(1, ge=0, description="epochs before the first germination is considered")
    grow_when: Literal["plateau", "epoch"] = Field(
        "plateau", description="plateau: germinate one seed at a time when validation loss plateaus; epoch: "
        "germinate in every free slot (up to seeds.max_active) once controller.grow_at_epoch epochs are done")
    grow_at_epoch: int | str | dict[str, int | str] = Field(
        1, description="grow_when = \"epoch\": the epoch after which seeds grow; a percentage (\"10%\") of "
        "trainer.epochs; or a table slot -> epoch for growth in stages ({s1 = 3, s2 = 6})")
    fossilize_min_improvement: float = Field(0.0, description="G4: val loss without the seed minus with it")
    stall_epochs: int = Field(6, ge=1, description="cull a seed stuck this many epochs in one stage")
    report_window_epochs: int = Field(2, ge=1, description="epochs observed before a field report is filed")
    risk: RiskConfig = Field(default_factory=RiskConfig)

    @field_validator("grow_at_epoch")
    @classmethod
    def _grow_at(cls, v: int | str | dict[str, int | str]) -> int | str | dict[str, int | str]:
        if isinstance(v, dict):
            if not v:
                raise ValueError("a table of growth epochs names at least one slot")
            out: dict[str, int | str] = {}
            for name, at in v.items():
                try:
                    out[name] = _grow_epoch(at)
                except ValueError as exc:  # a table is not echoed whole: say which entry, and what it held
                    raise ValueError(f"slot {bounded.clip(name, 40)!r} = {bounded.clip(repr(at), 40)}: {exc}") from exc
            return out
        return _grow_epoch(v)

    def grow_epochs(self, epochs: int) -> int | dict[str, int]:
        """``grow_at_epoch`` in epochs for a run of ``epochs`` (a percentage rounds up, at least epoch 1)."""
        at = self.grow_at_epoch
        if isinstance(at, dict):
            return {name: _epoch_of(e, epochs) for name, e in at.items()}
        return _epoch_of(at, epochs)

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v == "heuristic" or is_factory_ref(v):
            return v
        raise ValueError(f"must be 'heuristic' or 'module:function', got {v!r}")


class ProfilerConfig(_Section):
    enabled: bool = Field(False, description="record a torch.profiler window")
    dir: str = Field("", max_length=4096, description="trace directory (relative paths live in the run directory)",
                     json_schema_extra=PATH)
    wait: int = Field(1, ge=0, description="steps skipped before the window")
    warmup: int = Field(1, ge=0, description="warm-up steps of the window")
    active: int = Field(3, ge=1, le=1000, description="recorded steps (bounded)")

    @model_validator(mode="after")
    def _dir(self) -> ProfilerConfig:
        if self.enabled and not self.dir:
            raise ValueError("enabled = true requires dir")
        return self


class TrainerConfig(_Section):
    epochs: int = Field(24, ge=1, le=100000, description="epochs to train")
    lr: float = Field(0.05, gt=0.0, description="base learning rate of every param group")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="optimizer")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum")
    betas: list[float] = Field(default_factory=lambda: [0.9, 0.999], min_length=2, max_length=2,
                               description="AdamW betas (beta1, beta2), each in [0, 1)")
    weight_decay: float = Field(0.0, ge=0.0, description="weight decay")
    lr_policy: Literal["constant", "cosine", "step", "linear", "inverse_sqrt", "polynomial", "onecycle"] = Field(
        "cosine", description="LR policy after the warm-up: constant | cosine | step | linear (to min_lr at the run's "
                              "end) | inverse_sqrt (sqrt(warmup_steps / step)) | polynomial (to min_lr, power "
                              "poly_power) | onecycle (its own cosine rise and fall to min_lr; no warm-up)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up length in global steps")
    warmup_start_factor: float = Field(0.1, gt=0.0, le=1.0, description="warm-up starts at this factor of lr")
    cosine_t_max: int = Field(176, ge=0, description="cosine period in steps (176 = 8 digits epochs); 0 = the run")
    cosine_past_t_max: Literal["floor", "restart"] = Field("restart", description="cosine after t_max (warm restarts)")
    min_lr: float = Field(0.002, ge=0.0, description="cosine floor")
    step_size: int = Field(200, ge=1, description="step policy: steps between decays")
    step_gamma: float = Field(0.5, gt=0.0, le=1.0, description="step policy: decay factor")
    poly_power: float = Field(1.0, gt=0.0, le=100.0, description="polynomial policy: the decay's power")
    onecycle_pct_start: float = Field(0.3, gt=0.0, lt=1.0, description="onecycle: fraction of the run spent rising")
    onecycle_div_factor: float = Field(25.0, ge=1.0, le=1e6, description="onecycle: the rise starts at lr / this")
    grad_clip: float = Field(0.0, ge=0.0, description="max gradient norm; 0 disables clipping")
    accumulate_steps: int = Field(1, ge=1, le=4096, description="batches whose gradients make one optimizer step "
                                  "(their mean); an epoch's last window may be shorter. Schedule lengths "
                                  "(warmup_steps, cosine_t_max, step_size) count optimizer steps")
    ema: float = Field(0.0, ge=0.0, lt=1.0, description="decay of an exponential moving average of the weights, "
                       "updated after every optimizer step; every validation (and export) uses the averaged "
                       "weights; 0 = off")
    ema_warmup: bool = Field(True, description="the average's decay is min(ema, (1 + n) / (10 + n)) after n "
                             "updates of a parameter, so early averages (and a new seed's) follow the weights")
    early_stop_patience: int = Field(0, ge=0, le=100000, description="end the run once the primary metric has not "
                                     "improved for this many epochs; 0 never stops early")
    early_stop_min_delta: float = Field(0.0, ge=0.0, description="the smallest change of the primary metric that "
                                        "counts as an improvement (absolute)")
    profiler: ProfilerConfig = Field(default_factory=ProfilerConfig)

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: list[float]) -> list[float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must lie in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _floor(self) -> TrainerConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.lr_policy == "onecycle" and self.warmup_steps:
            raise ValueError("lr_policy = 'onecycle' rises by itself (onecycle_pct_start): set warmup_steps = 0")
        return self


class EsperConfig(_Section):
    """The whole run configuration."""

    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    host: HostConfig = Field(default_factory=HostConfig)
    seeds: SeedsConfig = Field(default_factory=SeedsConfig)
    controller: ControllerConfig = Field(default_factory=ControllerConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    rollback: RollbackConfig = Field(default_factory=RollbackConfig)
    emergency: EmergencyConfig = Field(default_factory=EmergencyConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    dist: DistConfig = Field(default_factory=DistConfig)
    faults: list[FaultConfig] = Field(default_factory=list, max_length=1000)
    bench: BenchConfig = Field(default_factory=BenchConfig)

    @model_validator(mode="after")
    def _growth_table(self) -> EsperConfig:
        at = self.controller.grow_at_epoch
        if isinstance(at, dict):
            slots = [s.name for s in self.seeds.slots]
            unknown, missing = sorted(set(at) - set(slots)), [n for n in slots if n not in at]
            if unknown or missing:
                said = "; ".join(f"{what} {bounded.clip(', '.join(names), 120)}" for what, names in
                                 (("names no such slot:", unknown), ("leaves out", missing)) if names)
                raise ValueError(f"controller.grow_at_epoch {said} (seeds.slots: {bounded.clip(', '.join(slots), 120)})"
                                 ": a table of growth epochs names every slot once")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())

    def config_hash(self) -> str:
        """sha256 of the canonical JSON form: equal configs hash equal whatever their file layout.

        ``faults`` are drill injections, not part of what is trained, so they do not enter the hash: a run
        halted by an injected fault resumes with the plain config. Nor does ``dist`` (how many processes train
        it is not what is trained: a run resumes at another world size).
        """
        body = {k: v for k, v in self.to_dict().items() if k not in ("faults", "dist")}
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
