"""Emergency level handling (L-4): detection rules of SPEC §3.4 and the level machine."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from esper.core.config import EmergencyConfig
from esper.core.errors import EsperError
from esper.statemachines import EMERGENCY, ESCALATE_TRIGGER, StrictMachine, TransitionRecord

Emit = Callable[..., Any]
LEVELS = EMERGENCY.state_names  # ordered NOMINAL..HALT


class UnknownLevel(EsperError):
    """A level name that is not in the emergency table."""


@dataclass(frozen=True)
class Signal:
    """A detected problem and the level the policy assigns to it."""

    level: str
    cause: str
    detail: str
    attributes: dict[str, Any]


def level_value(level: str) -> int:
    if level not in LEVELS:
        raise UnknownLevel(f"unknown emergency level {level!r}; levels: {', '.join(LEVELS)}")
    return EMERGENCY.value_of(level)


class EmergencyManager:
    """Owns the level machine and the detection thresholds (all from ``[emergency]``)."""

    def __init__(self, cfg: EmergencyConfig, emit: Emit) -> None:
        self.cfg = cfg
        self.emit = emit
        self.machine = StrictMachine(EMERGENCY, "run", observer=self._on_change)
        self.ewma: float | None = None
        self.healthy_epochs = 0
        self.consecutive_rollbacks = 0
        self.incident_epoch_unhealthy = False
        self.last_epoch_healthy = True

    @property
    def level(self) -> str:
        return self.machine.state

    # --------------------------------------------------------------- detection
    def check_loss(self, loss: float) -> Signal | None:
        if not math.isfinite(loss):
            return Signal("ELEVATED", "non_finite_loss", f"training loss is {loss}", {"loss": loss})
        if self.ewma is not None and loss > self.cfg.loss_explosion_factor * self.ewma:
            return Signal("ELEVATED", "loss_explosion",
                          f"loss {loss:.4g} > {self.cfg.loss_explosion_factor} x EWMA {self.ewma:.4g}",
                          {"loss": loss, "ewma": self.ewma})
        return None

    def accept_loss(self, loss: float) -> None:
        """Fold a healthy step's loss into the EWMA."""
        a = self.cfg.ewma_alpha
        self.ewma = loss if self.ewma is None else (1 - a) * self.ewma + a * loss

    @staticmethod
    def check_grads(named: list[tuple[str, torch.nn.Parameter]]) -> Signal | None:
        """One fused norm over every gradient (one sync per step); the offender is named only on failure."""
        grads = [p.grad for _, p in named if p.grad is not None]
        if not grads or bool(torch.isfinite(_total_norm(grads))):
            return None
        for name, p in named:
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                return Signal("ELEVATED", "non_finite_gradient", f"gradient of {name} is not finite",
                              {"parameter": name})
        # the norm overflowed although every entry is finite: as dangerous for the step, and said so
        return Signal("ELEVATED", "non_finite_gradient", "gradient norm overflows", {"parameter": None})

    # ------------------------------------------------------------------ levels
    def escalate(self, level: str, reason: str, **attributes: Any) -> bool:
        """Raise to ``level`` (monotonic within an incident). Returns whether the level changed."""
        target = level_value(level)
        self.incident_epoch_unhealthy = True
        if target <= self.machine.value:
            self.emit("tolaria", "emergency.signal", "WARNING", signal_level=level, current=self.level, reason=reason,
                      **attributes)
            return False
        if level == "NOMINAL":
            return False
        self.machine.fire(ESCALATE_TRIGGER[level], reason=reason)
        return True

    def downgrade(self, reason: str, *, clear: bool = False) -> None:
        """Explicit downgrade (one level, or to NOMINAL with ``clear``); recorded like any change."""
        self.machine.fire("clear" if clear else "downgrade", reason=reason)

    def operator_clear(self, reason: str) -> None:
        """An operator's clear (``esper emergency clear``): the table's ``clear`` to NOMINAL, a new incident
        count, recorded and emitted like every change (Tolaria #3, #5)."""
        self.machine.fire("clear", reason=reason)
        self.healthy_epochs = 0
        self.consecutive_rollbacks = 0

    def record_rollback(self) -> None:
        self.consecutive_rollbacks += 1

    def end_epoch(self) -> None:
        """Count healthy epochs; after ``recovery_epochs`` of them the policy clears the incident."""
        self.last_epoch_healthy = not self.incident_epoch_unhealthy
        if self.incident_epoch_unhealthy:
            self.healthy_epochs = 0
        else:
            self.healthy_epochs += 1
            self.consecutive_rollbacks = 0
        self.incident_epoch_unhealthy = False
        if self.level not in ("NOMINAL", "HALT") and self.healthy_epochs >= self.cfg.recovery_epochs:
            self.downgrade(f"policy: {self.healthy_epochs} healthy epoch(s) since the incident", clear=True)
            self.healthy_epochs = 0

    def history(self) -> list[dict[str, Any]]:
        return [r.to_dict() for r in self.machine.history]

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "ewma": self.ewma, "healthy_epochs": self.healthy_epochs,
                "consecutive_rollbacks": self.consecutive_rollbacks, "history": self.history()}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        """Restore on resume. HALT is terminal for a process, so a run resumed from an emergency checkpoint
        starts a new incident-free machine (the history, with the HALT, is kept)."""
        level = "NOMINAL" if d["level"] == "HALT" else d["level"]
        self.machine = StrictMachine(EMERGENCY, "run", observer=self._on_change, initial=level,
                                     history=[TransitionRecord(**h) for h in d["history"]])
        self.ewma = d["ewma"]
        self.healthy_epochs = d["healthy_epochs"]
        self.consecutive_rollbacks = d["consecutive_rollbacks"]

    def _on_change(self, record: TransitionRecord) -> None:
        # CRITICAL: the emitter makes it durable before the action this change announces runs
        self.emit("tolaria", "emergency.level", "CRITICAL", to_level=record.dest, from_level=record.source,
                  transition=record.to_dict())


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """``torch.nn.utils.get_total_norm(grads)``, the same value: when every gradient shares one device and dtype
    (a run's usual case) its per-device grouping is skipped, which is a third of the check's cost on a small
    model; otherwise the library function."""
    first = grads[0]
    if any(g.device != first.device or g.dtype != first.dtype for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads, 2.0)), 2.0)
