"""Random trigger sequences against StrictMachine, checked against a model computed from each table."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from esper.statemachines import (
    EMERGENCY,
    SEED,
    TRAINER,
    GateRejected,
    IllegalTransition,
    LifecycleError,
    LifecycleTable,
    StrictMachine,
    TransitionRecord,
)

SETTINGS = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# How the caller supplies a gate result: the right gate passing, the right gate failing, another gate, none.
GATE_MODES = ("pass", "fail", "wrong", "missing")


@dataclass(frozen=True)
class Gate:
    gate: str
    passed: bool
    reason: str = "property test"


class PrepareFailed(RuntimeError):
    pass


class LifecycleModel(RuleBasedStateMachine):
    """Drives one StrictMachine; ``self.expected`` is the model state computed from the table's edges."""

    table: ClassVar[LifecycleTable]

    def __init__(self) -> None:
        super().__init__()
        self.edges = {(s, e.trigger): e for e in self.table.edges for s in e.sources}
        self.seen: list[TransitionRecord] = []
        self.machine = StrictMachine(self.table, "subject", observer=self.seen.append)
        self.expected = self.table.initial
        self.applied = 0

    def _attempt(self, trigger: str, gate_mode: str, prepare_fails: bool) -> None:
        edge = self.edges.get((self.expected, trigger))
        before = self.machine.state
        gate: Gate | None = None
        if gate_mode != "missing":
            name = edge.gate if edge is not None and edge.gate else "G0"
            gate = Gate("G_other" if gate_mode == "wrong" else name, gate_mode != "fail")

        def prepare() -> None:
            if prepare_fails:
                raise PrepareFailed("side effect failed")

        if edge is None:
            expected_error: type[Exception] | None = IllegalTransition
        elif edge.gate is None and gate is not None:
            expected_error = LifecycleError  # a gate result for an ungated trigger is a caller bug
        elif edge.gate is not None and gate_mode != "pass":
            expected_error = GateRejected
        elif prepare_fails:
            expected_error = PrepareFailed
        else:
            expected_error = None

        try:
            rec = self.machine.fire(trigger, reason=f"step {self.applied}", gate=gate, prepare=prepare)
        except LifecycleError as exc:
            assert expected_error is not None and isinstance(exc, expected_error), (trigger, gate_mode, exc)
            if expected_error is LifecycleError:
                assert not isinstance(exc, (IllegalTransition, GateRejected))
            assert self.machine.state == before
            return
        except PrepareFailed:
            assert expected_error is PrepareFailed
            assert self.machine.state == before
            return
        assert expected_error is None, (self.expected, trigger, gate_mode, prepare_fails)
        assert edge is not None
        assert (rec.source, rec.dest, rec.trigger) == (before, edge.dest, trigger)
        self.expected = edge.dest
        self.applied += 1

    @rule(
        trigger=st.sampled_from([*SEED.triggers, *TRAINER.triggers, *EMERGENCY.triggers, "bogus"]),
        gate_mode=st.sampled_from(GATE_MODES),
        prepare_fails=st.booleans(),
    )
    def fire_any(self, trigger: str, gate_mode: str, prepare_fails: bool) -> None:
        self._attempt(trigger, gate_mode, prepare_fails)

    @rule(data=st.data())
    def fire_legal(self, data: st.DataObject) -> None:
        # Biased toward legal triggers with passing gates so walks reach deep states, not just illegal noise.
        legal = sorted({t for (s, t) in self.edges if s == self.expected})
        if not legal:
            return
        # Terminal exits are everywhere in the trainer table; favour the rest or walks end after two steps.
        onward = [t for t in legal if self.edges[(self.expected, t)].dest not in self.table.terminal]
        pool = data.draw(st.sampled_from([onward, onward, onward, legal])) if onward else legal
        trigger = data.draw(st.sampled_from(pool))
        gated = self.edges[(self.expected, trigger)].gate is not None
        prepare_fails = data.draw(st.sampled_from([False, False, False, True]))
        self._attempt(trigger, "pass" if gated else "missing", prepare_fails)

    @invariant()
    def state_matches_model(self) -> None:
        assert self.machine.state == self.expected

    @invariant()
    def history_chains(self) -> None:
        hist = self.machine.history
        assert hist == self.seen
        assert len(hist) == self.applied
        prev = self.table.initial
        for rec in hist:
            assert rec.source == prev
            assert self.edges[(rec.source, rec.trigger)].dest == rec.dest
            prev = rec.dest
        assert prev == self.machine.state
        stamps = [r.monotonic_ms for r in hist]
        assert stamps == sorted(stamps)

    @invariant()
    def terminal_states_have_no_exit(self) -> None:
        if self.machine.state in self.table.terminal:
            assert self.table.legal_triggers(self.machine.state) == ()
            for trigger in self.table.triggers:
                assert not self.machine.may(trigger)


class SeedLifecycle(LifecycleModel):
    table = SEED

    @invariant()
    def fossilized_never_culled(self) -> None:
        assert not any(r.source == "FOSSILIZED" and r.dest == "CULLED" for r in self.machine.history)

    @invariant()
    def terminated_is_final(self) -> None:
        hist = self.machine.history
        for i, rec in enumerate(hist):
            if rec.dest == "TERMINATED":
                assert i == len(hist) - 1

    @invariant()
    def cull_only_from_active(self) -> None:
        active = {"GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY"}
        assert all(r.source in active for r in self.machine.history if r.dest == "CULLED")


class TrainerLifecycle(LifecycleModel):
    table = TRAINER

    @invariant()
    def nothing_after_terminal(self) -> None:
        hist = self.machine.history
        for i, rec in enumerate(hist):
            if rec.dest in TRAINER.terminal:
                assert i == len(hist) - 1


class EmergencyLifecycle(LifecycleModel):
    table = EMERGENCY

    @invariant()
    def level_drops_only_on_explicit_downgrade(self) -> None:
        for rec in self.machine.history:
            up = EMERGENCY.value_of(rec.dest) > EMERGENCY.value_of(rec.source)
            if rec.trigger in ("downgrade", "clear"):
                assert not up
            else:
                assert up

    @invariant()
    def halt_is_terminal(self) -> None:
        hist = self.machine.history
        for i, rec in enumerate(hist):
            if rec.dest == "HALT":
                assert i == len(hist) - 1


TestSeedLifecycle = SeedLifecycle.TestCase
TestSeedLifecycle.settings = SETTINGS
TestTrainerLifecycle = TrainerLifecycle.TestCase
TestTrainerLifecycle.settings = SETTINGS
TestEmergencyLifecycle = EmergencyLifecycle.TestCase
TestEmergencyLifecycle.settings = SETTINGS
