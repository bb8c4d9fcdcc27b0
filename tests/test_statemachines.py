"""Lifecycle tables and the strict machine: trigger matrices, gates, side effects, records, validation."""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest

from esper.statemachines import (
    EMERGENCY,
    SEED,
    TRAINER,
    Edge,
    EmergencyLevel,
    GateRejected,
    IllegalTransition,
    LifecycleError,
    LifecycleTable,
    SeedStage,
    StrictMachine,
    TableError,
    TrainerState,
    TransitionRecord,
)


@dataclass(frozen=True)
class Gate:
    """Stand-in for Kasmina's GateResult: the machine only reads gate, passed and reason."""

    gate: str
    passed: bool
    reason: str = "test"


class Boom(RuntimeError):
    pass


def _oracle(table: LifecycleTable) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(state, trigger) -> (dest, gate), read from the edges directly, not through the table's helpers."""
    out: dict[tuple[str, str], tuple[str, str | None]] = {}
    for e in table.edges:
        for s in e.sources:
            out[(s, e.trigger)] = (e.dest, e.gate)
    return out


TABLES = {"seed": SEED, "trainer": TRAINER, "emergency": EMERGENCY}
MATRIX = [
    (name, state, trigger)
    for name, table in TABLES.items()
    for state in table.state_names
    for trigger in (*table.triggers, "no_such_trigger")
]


# --- the full (state, trigger) matrix of every table ----------------------------------------------------


@pytest.mark.parametrize(("name", "state", "trigger"), MATRIX, ids=[f"{n}-{s}-{t}" for n, s, t in MATRIX])
def test_matrix(name: str, state: str, trigger: str) -> None:
    table = TABLES[name]
    records: list[TransitionRecord] = []
    m = StrictMachine(table, "subj-1", observer=records.append, initial=state)
    expected = _oracle(table).get((state, trigger))
    if expected is None:
        assert not m.may(trigger)
        with pytest.raises(IllegalTransition) as info:
            m.fire(trigger, reason="matrix")
        err = info.value
        assert (err.machine, err.subject, err.state, err.trigger) == (name, "subj-1", state, trigger)
        assert m.state == state
        assert m.history == [] and records == []
        return
    dest, gate = expected
    assert m.may(trigger)
    assert m.require(trigger) == dest
    rec = m.fire(trigger, reason="matrix", gate=Gate(gate, True) if gate else None)
    assert m.state == dest
    assert m.value == table.value_of(dest)
    assert (rec.source, rec.dest, rec.trigger) == (state, dest, trigger)
    assert m.history == [rec] and records == [rec]


def test_matrix_covers_every_edge() -> None:
    # Guards the parametrisation itself: every table pair appears, so no edge escapes the matrix.
    covered = {(n, s, t) for n, s, t in MATRIX}
    for name, table in TABLES.items():
        for state, trigger in _oracle(table):
            assert (name, state, trigger) in covered


def test_require_raises_for_illegal_trigger() -> None:
    m = StrictMachine(SEED, "s1")
    with pytest.raises(IllegalTransition) as info:
        m.require("fossilize")
    assert info.value.state == "DORMANT" and info.value.trigger == "fossilize"
    assert m.state == "DORMANT"


def test_restore_at_unknown_state_is_rejected() -> None:
    with pytest.raises(IllegalTransition, match="unknown state"):
        StrictMachine(SEED, "s1", initial="ALIVE")


def test_restore_keeps_given_history() -> None:
    first = StrictMachine(SEED, "s1")
    first.fire("germinate", reason="r", gate=Gate("G0", True))
    again = StrictMachine(SEED, "s1", initial=first.state, history=first.history)
    assert again.state == "GERMINATED"
    assert again.history == first.history and again.history is not first.history


# --- gates ---------------------------------------------------------------------------------------------


GATED = [
    (name, s, e.trigger, e.gate) for name, t in TABLES.items() for e in t.edges if e.gate for s in e.sources
]


@pytest.mark.parametrize(("name", "state", "trigger", "gate"), GATED)
def test_missing_gate_result_rejected(name: str, state: str, trigger: str, gate: str) -> None:
    m = StrictMachine(TABLES[name], "s", initial=state)
    with pytest.raises(GateRejected) as info:
        m.fire(trigger, reason="r")
    err = info.value
    assert (err.subject, err.state, err.trigger) == ("s", state, trigger)
    assert err.result.gate == gate and err.result.passed is False
    assert m.state == state and m.history == []


@pytest.mark.parametrize(("name", "state", "trigger", "gate"), GATED)
def test_wrong_gate_result_rejected(name: str, state: str, trigger: str, gate: str) -> None:
    m = StrictMachine(TABLES[name], "s", initial=state)
    with pytest.raises(GateRejected) as info:
        m.fire(trigger, reason="r", gate=Gate("G9", True))
    assert info.value.result.gate == gate and info.value.result.passed is False
    assert "G9" in info.value.result.reason
    assert m.state == state and m.history == []


@pytest.mark.parametrize(("name", "state", "trigger", "gate"), GATED)
def test_failed_gate_rejected_with_its_result(name: str, state: str, trigger: str, gate: str) -> None:
    m = StrictMachine(TABLES[name], "s", initial=state)
    result = Gate(gate, False, "loss did not improve")
    with pytest.raises(GateRejected, match="loss did not improve") as info:
        m.fire(trigger, reason="r", gate=result)
    assert info.value.result is result
    assert m.state == state and m.history == []


def test_gate_result_on_ungated_trigger_is_an_error() -> None:
    m = StrictMachine(SEED, "s", initial="SHADOWING")
    with pytest.raises(LifecycleError, match="has no gate"):
        m.fire("start_probation", reason="r", gate=Gate("G3", True))
    assert m.state == "SHADOWING" and m.history == []


def test_passed_gate_is_recorded() -> None:
    m = StrictMachine(SEED, "s")
    rec = m.fire("germinate", reason="r", gate=Gate("G0", True, "sane"))
    assert rec.gate == {"gate": "G0", "passed": True, "reason": "sane"}


def test_gate_to_dict_is_used_when_present() -> None:
    @dataclass(frozen=True)
    class RichGate(Gate):
        def to_dict(self) -> dict[str, object]:
            return {"gate": self.gate, "passed": self.passed, "reason": self.reason, "attributes": {"n": 1}}

    rec = StrictMachine(SEED, "s").fire("germinate", reason="r", gate=RichGate("G0", True))
    assert rec.gate is not None and rec.gate["attributes"] == {"n": 1}


# --- side effects --------------------------------------------------------------------------------------


def test_prepare_that_raises_aborts_the_transition() -> None:
    records: list[TransitionRecord] = []
    m = StrictMachine(SEED, "s", observer=records.append)

    def attach() -> None:
        raise Boom("could not attach blueprint")

    with pytest.raises(Boom, match="could not attach"):
        m.fire("germinate", reason="r", gate=Gate("G0", True), prepare=attach)
    assert m.state == "DORMANT" and m.history == [] and records == []
    # the machine is still usable afterwards
    m.fire("germinate", reason="r", gate=Gate("G0", True))
    assert m.state == "GERMINATED"


def test_prepare_runs_once_after_gate_before_state_change() -> None:
    m = StrictMachine(SEED, "s", initial="PROBATIONARY")
    seen: list[str] = []
    m.fire("fossilize", reason="r", gate=Gate("G4", True), prepare=lambda: seen.append(m.state))
    assert seen == ["PROBATIONARY"]
    assert m.state == "FOSSILIZED"


def test_prepare_not_run_when_gate_fails() -> None:
    m = StrictMachine(SEED, "s", initial="PROBATIONARY")
    seen: list[str] = []
    with pytest.raises(GateRejected):
        m.fire("fossilize", reason="r", gate=Gate("G4", False), prepare=lambda: seen.append("ran"))
    assert seen == []


def test_prepare_not_run_for_illegal_trigger() -> None:
    m = StrictMachine(SEED, "s", initial="FOSSILIZED")
    seen: list[str] = []
    with pytest.raises(IllegalTransition):
        m.fire("cull", reason="r", prepare=lambda: seen.append("ran"))
    assert seen == [] and m.state == "FOSSILIZED"


# --- records and reasons -------------------------------------------------------------------------------


def test_observer_receives_full_record() -> None:
    records: list[TransitionRecord] = []
    m = StrictMachine(EMERGENCY, "run-7", observer=records.append)
    before_utc = datetime.now(UTC)
    before_ms = time.monotonic() * 1000.0
    first = m.fire("raise_elevated", reason="nan loss")
    second = m.fire("downgrade", reason="operator")
    assert records == [first, second] == m.history
    assert (first.machine, first.subject) == ("emergency", "run-7")
    assert (first.source, first.dest) == ("NOMINAL", "ELEVATED")
    assert (first.trigger, first.reason, first.gate) == ("raise_elevated", "nan loss", None)
    assert (second.source, second.dest) == ("ELEVATED", "NOTICE")
    assert (second.trigger, second.reason) == ("downgrade", "operator")
    stamp = datetime.fromisoformat(first.utc)
    assert stamp.utcoffset() is not None and stamp.utcoffset().total_seconds() == 0
    assert before_utc <= stamp <= datetime.now(UTC)
    assert before_ms <= first.monotonic_ms <= second.monotonic_ms <= time.monotonic() * 1000.0
    assert first.to_dict()["dest"] == "ELEVATED" and set(first.to_dict()) >= {"utc", "monotonic_ms", "reason"}


@pytest.mark.parametrize("reason", ["", "   ", None])
def test_empty_reason_rejected(reason: object) -> None:
    records: list[TransitionRecord] = []
    m = StrictMachine(TRAINER, "t", observer=records.append)
    with pytest.raises(LifecycleError, match="needs a reason"):
        m.fire("ready", reason=reason)  # type: ignore[arg-type]
    assert m.state == "INITIALIZING" and m.history == [] and records == []


# --- table validation ----------------------------------------------------------------------------------

_OK_STATES = (("A", 1, ""), ("B", 2, ""), ("C", 3, ""))
_OK_EDGES = (Edge("go", ("A",), "B"), Edge("end", ("B",), "C"))


def _table(**kw: object) -> LifecycleTable:
    args: dict[str, object] = {
        "name": "toy", "states": _OK_STATES, "initial": "A", "terminal": frozenset({"C"}), "edges": _OK_EDGES,
    }
    args.update(kw)
    return LifecycleTable(**args)  # type: ignore[arg-type]


def test_valid_toy_table_builds() -> None:
    t = _table()
    assert t.state_names == ("A", "B", "C") and t.enum["B"] == 2


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        ({"states": (("A", 1, ""), ("B", 1, ""), ("C", 3, ""))}, "duplicate state values"),
        ({"states": (("A", 1, ""), ("A", 2, ""), ("C", 3, ""))}, "duplicate state names"),
        ({"states": (*_OK_STATES, ("D", 4, "")), "terminal": frozenset({"C", "D"})},
         "unreachable states ['D']"),
        ({"edges": (Edge("go", ("A",), "B"), Edge("end", ("A",), "C"))}, "non-terminal state B has no exit"),
        ({"edges": (*_OK_EDGES, Edge("back", ("C",), "A"))}, "terminal state C has exit 'back'"),
        ({"edges": (*_OK_EDGES, Edge("jump", ("A",), "Z"))}, "unknown state 'Z'"),
        ({"edges": (*_OK_EDGES, Edge("jump", ("Y",), "C"))}, "unknown state 'Y'"),
        ({"edges": (*_OK_EDGES, Edge("go", ("A",), "C"))}, "'go' is ambiguous from A"),
        ({"initial": "Q"}, "initial state 'Q'"),
        ({"terminal": frozenset({"C", "Q"})}, "unknown terminal states ['Q']"),
    ],
    ids=["dup-values", "dup-names", "unreachable", "no-exit", "terminal-exit", "unknown-dest",
         "unknown-source", "ambiguous", "bad-initial", "bad-terminal"],
)
def test_broken_tables_rejected(kw: dict[str, object], needle: str) -> None:
    with pytest.raises(TableError) as info:
        _table(**kw)
    assert needle in str(info.value)
    assert str(info.value).startswith("toy:")


# --- the contract content of the tables ----------------------------------------------------------------

SPEC_SEED_STAGES = [
    ("DORMANT", 1), ("GERMINATED", 2), ("TRAINING", 3), ("BLENDING", 4), ("SHADOWING", 5),
    ("PROBATIONARY", 6), ("FOSSILIZED", 7), ("CULLED", 8), ("EMBARGOED", 9), ("RESETTING", 10),
    ("TERMINATED", 11),
]
# SPEC §3.1 transition table, restated independently of the code.
SPEC_SEED_EDGES = {
    ("germinate", ("DORMANT",), "GERMINATED", "G0"),
    ("start_training", ("GERMINATED",), "TRAINING", "G1"),
    ("start_blending", ("TRAINING",), "BLENDING", "G2"),
    ("start_shadowing", ("BLENDING",), "SHADOWING", "G3"),
    ("start_probation", ("SHADOWING",), "PROBATIONARY", None),
    ("fossilize", ("PROBATIONARY",), "FOSSILIZED", "G4"),
    ("cull", ("GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY"), "CULLED", None),
    ("embargo", ("CULLED",), "EMBARGOED", None),
    ("reset", ("EMBARGOED",), "RESETTING", None),
    ("reactivate", ("RESETTING",), "DORMANT", "G5"),
    ("terminate", ("DORMANT", "FOSSILIZED"), "TERMINATED", None),
}


def test_seed_stages_are_the_contract() -> None:
    assert [(n, v) for n, v, _ in SEED.states] == SPEC_SEED_STAGES
    assert [(s.name, s.value) for s in SeedStage] == SPEC_SEED_STAGES
    assert SEED.initial == "DORMANT" and SEED.terminal == frozenset({"TERMINATED"})


def test_seed_transitions_are_spec_3_1() -> None:
    assert {(e.trigger, e.sources, e.dest, e.gate) for e in SEED.edges} == SPEC_SEED_EDGES
    assert len(SEED.edges) == len(SPEC_SEED_EDGES)


def test_fossilized_cannot_be_culled() -> None:
    assert SEED.destination("FOSSILIZED", "cull") is None
    assert SEED.legal_triggers("FOSSILIZED") == ("terminate",)


def test_trainer_states_and_terminals() -> None:
    names = ["INITIALIZING", "READY", "TRAINING", "VALIDATING", "CHECKPOINTING", "PAUSED", "ROLLING_BACK",
             "STOPPED", "HALTED", "COMPLETED", "FAILED"]
    assert list(TRAINER.state_names) == names
    assert [s.value for s in TrainerState] == list(range(1, 12))
    assert TRAINER.terminal == frozenset({"STOPPED", "HALTED", "COMPLETED", "FAILED"})
    assert TRAINER.destination("PAUSED", "validate") == "VALIDATING"
    assert TRAINER.destination("CHECKPOINTING", "stop") == "STOPPED"


def test_emergency_levels_and_directions() -> None:
    assert [(s.name, s.value) for s in EmergencyLevel] == [
        ("NOMINAL", 0), ("NOTICE", 1), ("ELEVATED", 2), ("CONSERVATIVE", 3), ("HALT", 4)]
    assert EMERGENCY.terminal == frozenset({"HALT"})
    for e in EMERGENCY.edges:
        for s in e.sources:
            up = EMERGENCY.value_of(e.dest) > EMERGENCY.value_of(s)
            # only the explicit downgrade/clear triggers lower the level; every other trigger raises it
            assert up == (e.trigger not in ("downgrade", "clear")), (e.trigger, s)


def test_statemachines_import_no_torch_and_no_core() -> None:
    code = (
        "import esper.statemachines, sys; "
        "assert 'torch' not in sys.modules, 'torch imported'; "
        "assert not [m for m in sys.modules if m.startswith('esper.core')], 'esper.core imported'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
