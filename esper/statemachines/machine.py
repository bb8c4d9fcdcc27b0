"""One strict wrapper over the ``transitions`` library, shared by every lifecycle."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from transitions import Machine, MachineError

from esper.statemachines.errors import GateRejected, IllegalTransition, LifecycleError
from esper.statemachines.table import LifecycleTable


class GateLike(Protocol):
    gate: str
    passed: bool
    reason: str


@dataclass(frozen=True)
class TransitionRecord:
    """One applied transition."""

    machine: str
    subject: str
    source: str
    dest: str
    trigger: str
    reason: str
    utc: str
    monotonic_ms: float
    gate: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Observer = Callable[[TransitionRecord], None]


class _Model:
    """The object ``transitions`` mutates; kept private so only StrictMachine drives it."""

    state: str


class StrictMachine:
    """A lifecycle instance: illegal triggers raise, gates must pass, every change is recorded."""

    def __init__(
        self,
        table: LifecycleTable,
        subject: str,
        *,
        observer: Observer | None = None,
        initial: str | None = None,
        history: list[TransitionRecord] | None = None,
    ) -> None:
        self.table = table
        self.subject = subject
        self.observer = observer
        self.history: list[TransitionRecord] = list(history or [])
        self._model = _Model()
        start = initial or table.initial
        if start not in table.state_names:
            raise IllegalTransition(table.name, subject, str(start), "<restore>", "unknown state")
        self._machine = Machine(
            model=self._model,
            states=list(table.state_names),
            transitions=[
                {
                    "trigger": e.trigger,
                    "source": list(e.sources),
                    "dest": e.dest,
                    "conditions": [self._check_gate],
                    "before": [self._run_prepare],
                }
                for e in table.edges
            ],
            initial=start,
            auto_transitions=False,
            ignore_invalid_triggers=False,
            send_event=True,
        )

    @property
    def state(self) -> str:
        return self._model.state

    @property
    def value(self) -> int:
        return self.table.value_of(self.state)

    def may(self, trigger: str) -> bool:
        """Whether ``trigger`` is legal from the current state (gates not evaluated)."""
        return self.table.destination(self.state, trigger) is not None

    def require(self, trigger: str) -> str:
        """Raise IllegalTransition unless ``trigger`` is legal now; return its destination."""
        dest = self.table.destination(self.state, trigger)
        if dest is None:
            raise IllegalTransition(self.table.name, self.subject, self.state, trigger)
        return dest

    def fire(
        self,
        trigger: str,
        *,
        reason: str,
        gate: GateLike | None = None,
        prepare: Callable[[], None] | None = None,
    ) -> TransitionRecord:
        """Apply ``trigger``. ``prepare`` runs after the gate and before the state changes."""
        if not isinstance(reason, str) or not reason.strip():
            raise LifecycleError(f"{self.table.name} {self.subject!r}: trigger {trigger!r} needs a reason")
        self.require(trigger)  # raises before transitions sees unknown triggers
        source = self.state
        try:
            done = self._model.trigger(trigger, gate=gate, prepare=prepare)  # type: ignore[attr-defined]
        except MachineError as exc:  # defence in depth: the table check above should catch these
            raise IllegalTransition(self.table.name, self.subject, source, trigger, str(exc.value)) from exc
        if not done:  # conditions raise instead of returning False, so this means a library change
            raise LifecycleError(f"{self.table.name} {self.subject!r}: {trigger!r} did not apply")
        record = TransitionRecord(
            machine=self.table.name,
            subject=self.subject,
            source=source,
            dest=self.state,
            trigger=trigger,
            reason=reason,
            utc=datetime.now(UTC).isoformat(),
            monotonic_ms=time.monotonic() * 1000.0,
            gate=_gate_dict(gate),
        )
        self.history.append(record)
        if self.observer is not None:
            self.observer(record)
        return record

    def _check_gate(self, event: Any) -> bool:
        edge = self.table.edge(self.state, event.event.name)
        assert edge is not None
        result = event.kwargs.get("gate")
        if edge.gate is None:
            if result is not None:
                raise LifecycleError(f"{self.table.name}: trigger {edge.trigger!r} has no gate, got {result}")
            return True
        if result is None:
            raise GateRejected(self.table.name, self.subject, self.state, edge.trigger,
                               _Missing(edge.gate))
        if getattr(result, "gate", None) != edge.gate:
            raise GateRejected(self.table.name, self.subject, self.state, edge.trigger,
                               _Missing(edge.gate, f"got a result of gate {getattr(result, 'gate', None)}"))
        if not result.passed:
            raise GateRejected(self.table.name, self.subject, self.state, edge.trigger, result)
        return True

    @staticmethod
    def _run_prepare(event: Any) -> None:
        prepare = event.kwargs.get("prepare")
        if prepare is not None:
            prepare()


@dataclass(frozen=True)
class _Missing:
    gate: str
    reason: str = "no gate result supplied"
    passed: bool = False


def _gate_dict(gate: GateLike | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    to_dict = getattr(gate, "to_dict", None)
    if callable(to_dict):
        return to_dict()
    return {"gate": gate.gate, "passed": gate.passed, "reason": gate.reason}
