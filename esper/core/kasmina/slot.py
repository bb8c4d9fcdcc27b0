"""One slot at a named host layer, holding at most one seed driven by the L-1 machine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from esper.core.kasmina.blending import BlendSpec, alpha_at, blend, blend_weights, gate_sparsity
from esper.core.kasmina.kinds import SlotShape
from esper.statemachines import SEED, SEED_LIVE, StrictMachine
from esper.statemachines.machine import Observer


class Mode(enum.Enum):
    NORMAL = "normal"  # stage-driven behaviour
    BYPASS = "bypass"  # host alone (counterfactual evaluation, confidence logits)
    SUBSTITUTE = "substitute"  # TRAINING seed's own loss: seed output replaces the host activation


# Stages in which the seed contributes to the host output (input still detached until FOSSILIZED).
BLENDED = frozenset({"BLENDING", "SHADOWING", "PROBATIONARY"})
# Stages that hold a live, not-yet-permanent seed (the table's cull sources).
LIVE = SEED_LIVE


class SeedForwardError(RuntimeError):
    """A seed's forward pass raised; the trainer treats it as an emergency for this seed."""

    def __init__(self, slot: str, cause: BaseException) -> None:
        self.slot = slot
        super().__init__(f"seed in slot {slot!r} failed in forward: {cause!r}")


@dataclass
class SeedStats:
    """Per-seed counters; all cleared by a reset (G5 checks that)."""

    epochs_in_stage: int = 0
    alpha_step: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    loss_sum: float = 0.0
    loss_count: int = 0
    latency_ms_sum: float = 0.0
    counterfactual: dict[str, float] = field(default_factory=dict)
    embargo_left: int = 0
    # blend telemetry of the current epoch's training steps (Kasmina arch 1): sums, read and cleared per epoch
    blend_steps: int = 0
    alpha_sum: float = 0.0
    sparsity_sum: float = 0.0

    def clear(self) -> None:
        self.__init__()  # type: ignore[misc]

    def is_clear(self) -> bool:
        return self == SeedStats()

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v)
                for k, v in self.__dict__.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeedStats:
        return cls(**d)


class SeedSlot:
    """Forward-hook behaviour of one slot, per stage of its seed. ``shape`` is the slot's activation (kind and
    one sample's shape); ``resumable`` says whether the host's ``forward_from`` covers the slot's layer."""

    def __init__(self, name: str, layer: str, shape: SlotShape, spec: BlendSpec, observer: Observer | None,
                 resumable: bool = False) -> None:
        self.name = name
        self.layer = layer
        self.shape = shape
        self.resumable = resumable
        self.spec = spec
        self.machine = StrictMachine(SEED, name, observer=observer)
        self.module: nn.Module | None = None
        self.blueprint: str | None = None
        self.seed_id: str | None = None
        self.germinations = 0
        self.stats = SeedStats()
        self.mode = Mode.NORMAL
        self.detach_input = True  # T-5; only a unit test of the isolation monitor turns this off
        self.logits: torch.Tensor | None = None
        self.last_output: torch.Tensor | None = None
        self.last_input: torch.Tensor | None = None
        self.fail_forward: BaseException | None = None  # fault injection: raised inside the seed's forward

    @property
    def stage(self) -> str:
        return self.machine.state

    @property
    def alpha(self) -> float:
        if self.stage == "FOSSILIZED" or self.stage in BLENDED - {"BLENDING"}:
            return 1.0
        if self.stage == "BLENDING":
            return alpha_at(self.stats.alpha_step, self.spec.steps)
        return 0.0

    def params(self) -> list[nn.Parameter]:
        return list(self.module.parameters()) if self.module is not None else []

    def blend(self, host: torch.Tensor, seed: torch.Tensor, alpha: float,
              seed_input: torch.Tensor | None = None) -> torch.Tensor:
        """The configured blend on this slot's channel axis (``seed_input``: what the seed was given)."""
        return blend(host, seed, alpha, self.spec, self.logits, channel_axis=self.shape.channel_axis,
                     seed_input=seed_input)

    def seed_output(self, x: torch.Tensor) -> torch.Tensor:
        """The seed's output on ``x`` (recorded for G3, faults applied)."""
        out = self._seed(x)
        self.last_output = out
        return out

    def _seed(self, x: torch.Tensor) -> torch.Tensor:
        assert self.module is not None
        if self.fail_forward is not None:
            cause, self.fail_forward = self.fail_forward, None
            raise SeedForwardError(self.name, cause)
        return self.module(x)

    def hook(self, _module: nn.Module, _inputs: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        self.last_input = out
        stage = self.stage
        if self.mode is Mode.BYPASS or self.module is None:
            return out
        if stage == "TRAINING":
            if self.mode is not Mode.SUBSTITUTE:
                return out  # output computed only in the seed's own pass: host gradients stay bit-identical
            x = out.detach()
            s = self._seed(x)
            self.last_output = s
            return self.blend(x, s, 1.0, seed_input=x)
        if stage in BLENDED:
            x = out.detach() if self.detach_input else out
            s = self._seed(x)
            self.last_output = s
            return self.blend(out, s, self.alpha, seed_input=x)
        if stage == "FOSSILIZED":
            # part of the host now: its input is the live activation, and the blend counts that path once
            s = self._seed(out)
            return self.blend(out, s, 1.0, seed_input=out)
        return out

    def observe_blend(self) -> None:
        """Count one applied training step's blend (Kasmina calls it once per step, before alpha advances):
        its alpha and, for channel/confidence, the sparsity of the seed's weights on that step's activation."""
        host = self.last_input
        if self.stage not in BLENDED or host is None:
            return
        alpha = self.alpha
        weights = blend_weights(host, alpha, self.spec, self.logits, channel_axis=self.shape.channel_axis)
        self.stats.blend_steps += 1
        self.stats.alpha_sum += alpha
        if weights is not None:
            self.stats.sparsity_sum += gate_sparsity(weights)

    def blend_telemetry(self) -> dict[str, Any] | None:
        """This epoch's mean alpha and, for channel/confidence blending, mean gate sparsity (the fraction of
        seed weights under 1e-3) over its training steps with the seed blended in; None when it had none."""
        n = self.stats.blend_steps
        if n == 0:
            return None
        out: dict[str, Any] = {"seed_id": self.seed_id, "alpha_mean": self.stats.alpha_sum / n, "steps": n}
        if self.spec.mode in ("channel", "confidence"):
            out["gate_sparsity"] = self.stats.sparsity_sum / n
        return out

    def clear_blend_telemetry(self) -> None:
        self.stats.blend_steps, self.stats.alpha_sum, self.stats.sparsity_sum = 0, 0.0, 0.0

    def record(self) -> dict[str, Any]:
        """The slot's seed record (checkpoints, summary, inspect)."""
        return {
            "slot": self.name,
            "layer": self.layer,
            "seed_id": self.seed_id,
            "blueprint": self.blueprint,
            "stage": self.stage,
            "stage_value": self.machine.value,
            "alpha": self.alpha,
            "epochs_in_stage": self.stats.epochs_in_stage,
            "germinations": self.germinations,
            "stats": self.stats.to_dict(),
            "history": [r.to_dict() for r in self.machine.history],
        }
