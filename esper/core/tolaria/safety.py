"""Tolaria's safety component: what each emergency level does (SPEC §3.4).

ELEVATED rolls back to last-known-good (the bad step is never applied) and restarts from there; CONSERVATIVE
pauses lifecycle mutations while the host keeps training; HALT writes an emergency checkpoint of the
last-known-good state and stops the run. The level change is emitted (CRITICAL, durable) before its action.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from esper.core.errors import CheckpointError
from esper.core.kasmina.slot import LIVE
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.rollback import RollbackError
from esper.core.tolaria.state import Position
from esper.statemachines import EMERGENCY

if TYPE_CHECKING:
    from esper.core.tolaria.trainer import Trainer


class Restart(Exception):  # noqa: N818 - control flow, not an error
    """Training resumes from ``position`` (after a rollback)."""

    def __init__(self, position: Position) -> None:
        super().__init__(f"restart at {position}")
        self.position = position


class Halt(Exception):  # noqa: N818 - control flow, not an error
    """The run must halt (level HALT reached)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Safety:
    def __init__(self, trainer: Trainer) -> None:
        self.tr = trainer
        self.halting = False

    @property
    def paused(self) -> bool:
        return self.tr.emergency.machine.value >= EMERGENCY.value_of("CONSERVATIVE")

    def handle(self, signal: Signal, cull: str | None = None) -> None:
        """Escalate, then act for the signal's level. May raise Restart or Halt."""
        tr = self.tr
        reason = f"{signal.cause}: {signal.detail}"
        tr.emergency.escalate(signal.level, reason, cause=signal.cause, **signal.attributes)
        if signal.level == "ELEVATED":
            self.rollback(signal, cull)
        elif signal.level == "CONSERVATIVE":
            self.pause(reason)
        elif signal.level == "HALT":
            raise Halt(reason)

    def pause(self, reason: str) -> None:
        if self.tr.machine.may("pause") and self.tr.machine.state != "PAUSED":
            self.tr.machine.fire("pause", reason=f"CONSERVATIVE: {reason}")

    def rollback(self, signal: Signal, cull: str | None) -> None:
        tr = self.tr
        tr.machine.fire("rollback", reason=f"{signal.cause}: restore last-known-good")
        before = tr.global_step
        try:
            result = tr.rollback_mgr.rollback(f"{signal.cause}: {signal.detail}")
        except (RollbackError, CheckpointError) as exc:
            tr.emit("tolaria", "rollback.failed", "CRITICAL", cause=signal.cause, error=str(exc))
            tr.emergency.escalate("HALT", f"rollback failed: {exc}")
            raise Halt(f"rollback failed: {exc}") from exc
        record = {**result.to_dict(), "cause": signal.cause, "epoch": tr.epoch, "global_step_before": before}
        tr.rollbacks.append(record)
        tr.emit("tolaria", "rollback.completed", "WARNING" if result.within_sla else "CRITICAL", **record)
        if not result.within_sla:
            tr.emergency.escalate("HALT", f"{result.tier} rollback took {result.latency_ms:.1f} ms > "
                                          f"SLA {result.sla_ms:.0f} ms")
            raise Halt("rollback SLA missed")
        tr.emergency.record_rollback()
        if cull is not None and tr.kasmina.slots[cull].stage in LIVE:
            tr.kasmina.cull(cull, reason=f"emergency: {signal.cause}")
            tr.rebuild_optimizer(f"culled {cull} after {signal.cause}")
        n, limit = tr.emergency.consecutive_rollbacks, tr.cfg.emergency.max_consecutive_rollbacks
        if n > limit:
            tr.emergency.escalate("HALT", f"{n} rollbacks without a healthy epoch (limit {limit})")
            raise Halt("too many consecutive rollbacks")
        if n == limit:
            tr.emergency.escalate("CONSERVATIVE", f"{n} rollbacks without a healthy epoch")
        tr.machine.fire("pause" if self.paused else "train", reason=f"rolled back ({result.tier} tier)")
        assert tr.rollback_mgr.position is not None
        raise Restart(tr.rollback_mgr.position)

    def halt(self, reason: str) -> None:
        """Emergency checkpoint of the last-known-good state, then HALTED (exit 6)."""
        tr = self.tr
        self.halting = True
        if tr.emergency.level != "HALT":
            tr.emergency.escalate("HALT", reason)
        pos = None
        if tr.rollback_mgr.payload is not None:
            try:
                if tr.machine.may("rollback"):
                    tr.machine.fire("rollback", reason="HALT: restore last-known-good for the emergency checkpoint")
                tr.rollback_mgr.rollback("HALT: restore last-known-good")
                pos = tr.rollback_mgr.position
            except (RollbackError, CheckpointError) as exc:
                tr.emit("tolaria", "rollback.failed", "CRITICAL", cause="halt", error=str(exc))
        if pos is not None and tr.machine.may("checkpoint"):
            tr.machine.fire("checkpoint", reason="HALT: emergency checkpoint of last-known-good")
            tr.write_checkpoint(pos, "emergency")
        tr.machine.fire("halt", reason=reason)
