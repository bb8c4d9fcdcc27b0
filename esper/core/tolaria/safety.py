"""Tolaria's safety component: what each emergency level does (SPEC §3.4).

ELEVATED rolls back to last-known-good (the bad step is never applied) and restarts from there; when a loss
spike or a non-finite loss raised it, the batch that did is skipped on the replay and ever after (H-6, as
large-scale practice does: a deterministic replay would only meet the same batch again); CONSERVATIVE
pauses lifecycle mutations while the host keeps training; HALT writes an emergency checkpoint of the
last-known-good state and stops the run. The level change is emitted (CRITICAL, durable) before its action.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esper.core.config import EmergencyConfig
from esper.core.data import BatchSkips
from esper.core.errors import CheckpointError
from esper.core.kasmina import LIVE, Kasmina
from esper.core.tolaria.checkpointer import Checkpointer
from esper.core.tolaria.emergency import EmergencyManager, Signal
from esper.core.tolaria.optimizer import OptimizerPart
from esper.core.tolaria.rollback import RollbackError, RollbackManager
from esper.core.tolaria.train_state import Position, TrainState
from esper.statemachines import EMERGENCY, StrictMachine

# causes whose rollback skips the batch that raised them: the loss of that batch was the problem. A non-finite
# gradient can come from the model's state as much as from the batch, and a data or forced fault from neither.
SKIP_CAUSES = frozenset({"loss_explosion", "non_finite_loss"})


class Restart(Exception):  # noqa: N818 - control flow, not an error
    """Training resumes from ``position`` (after a rollback)."""

    def __init__(self, position: Position, reason: str = "") -> None:
        super().__init__(f"restart at {position}")
        self.position = position
        self.reason = reason  # what the operator is told (the epoch about to be replayed, and why)


class Halt(Exception):  # noqa: N818 - control flow, not an error
    """The run must halt (level HALT reached)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Safety:
    """Turns signals into level changes and their actions, on the parts it is given."""

    def __init__(self, cfg: EmergencyConfig, machine: StrictMachine, emergency: EmergencyManager,
                 rollback: RollbackManager, checkpointer: Checkpointer, state: TrainState, skips: BatchSkips,
                 kasmina: Kasmina, optimizer: OptimizerPart, emit: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.machine = machine
        self.emergency = emergency
        self.rollback_mgr = rollback
        self.checkpointer = checkpointer
        self.state = state
        self.skips = skips
        self.kasmina = kasmina
        self.optimizer = optimizer
        self.emit = emit

    @property
    def paused(self) -> bool:
        return self.emergency.machine.value >= EMERGENCY.value_of("CONSERVATIVE")

    def handle(self, signal: Signal | None, cull: str | None = None) -> None:
        """Escalate, then act for the signal's level (None: nothing happened). May raise Restart or Halt."""
        if signal is None:
            return
        reason = f"{signal.cause}: {signal.detail}"
        self.emergency.escalate(signal.level, reason, cause=signal.cause, **signal.attributes)
        if signal.level == "ELEVATED":
            self.rollback(signal, cull)
        elif signal.level == "CONSERVATIVE":
            self.pause(reason)
        elif signal.level == "HALT":
            raise Halt(reason)

    def pause(self, reason: str) -> None:
        if self.machine.may("pause") and self.machine.state != "PAUSED":
            self.machine.fire("pause", reason=f"CONSERVATIVE: {reason}")

    def rollback(self, signal: Signal, cull: str | None) -> None:
        self.machine.fire("rollback", reason=f"{signal.cause}: restore last-known-good")
        before = self.state.global_step
        at = (self.state.epoch, self.state.step_in_epoch)  # the batch of the bad step (the loop's position)
        try:
            result = self.rollback_mgr.rollback(f"{signal.cause}: {signal.detail}")
        except (RollbackError, CheckpointError) as exc:
            self.emit("tolaria", "rollback.failed", "CRITICAL", cause=signal.cause, error=str(exc))
            self.emergency.escalate("HALT", f"rollback failed: {exc}")
            raise Halt(f"rollback failed: {exc}") from exc
        record = {**result.to_dict(), "cause": signal.cause, "epoch": self.state.epoch, "global_step_before": before,
                  "skip": None}
        if signal.cause in SKIP_CAUSES:
            record["skip"] = self.skips.add(at[0], at[1], signal.cause, before).to_dict()
        self.state.rollbacks.append(record)
        self.emit("tolaria", "rollback.completed", "WARNING" if result.within_sla else "CRITICAL", **record)
        if not result.within_sla:
            self.emergency.escalate("HALT", f"{result.tier} rollback took {result.latency_ms:.1f} ms > "
                                            f"SLA {result.sla_ms:.0f} ms")
            raise Halt("rollback SLA missed")
        self.emergency.record_rollback()
        if cull is not None and self.kasmina.slots[cull].stage in LIVE:
            self.kasmina.cull(cull, reason=f"emergency: {signal.cause}")
            self.optimizer.rebuild(f"culled {cull} after {signal.cause}")
        n, limit = self.emergency.consecutive_rollbacks, self.cfg.max_consecutive_rollbacks
        if n > limit:
            self.emergency.escalate("HALT", f"{n} rollbacks without a healthy epoch (limit {limit})")
            raise Halt("too many consecutive rollbacks")
        if n == limit:
            self.emergency.escalate("CONSERVATIVE", f"{n} rollbacks without a healthy epoch")
        self.machine.fire("pause" if self.paused else "train", reason=f"rolled back ({result.tier} tier)")
        pos = self.state.position
        raise Restart(pos, f"rollback ({result.tier} tier, {result.latency_ms:.1f} ms) after {signal.cause}: "
                           f"epoch {pos.epochs_done + 1} is replayed from step {pos.step_in_epoch}"
                           + (f", leaving out batch {at[1]} of epoch {at[0]}" if record["skip"] else ""))

    def halt(self, reason: str) -> None:
        """Emergency checkpoint of the last-known-good state, then HALTED (exit 6)."""
        if self.emergency.level != "HALT":
            self.emergency.escalate("HALT", reason)
        restored = False
        if self.rollback_mgr.has_snapshot:
            try:
                if self.machine.may("rollback"):
                    self.machine.fire("rollback", reason="HALT: restore last-known-good for the emergency checkpoint")
                self.rollback_mgr.rollback("HALT: restore last-known-good")
                restored = True
            except (RollbackError, CheckpointError) as exc:
                self.emit("tolaria", "rollback.failed", "CRITICAL", cause="halt", error=str(exc))
        if restored and self.machine.may("checkpoint"):
            self.machine.fire("checkpoint", reason="HALT: emergency checkpoint of last-known-good")
            self.handle(self.checkpointer.save("emergency"))
        self.machine.fire("halt", reason=reason)
