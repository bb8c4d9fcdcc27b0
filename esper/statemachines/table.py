"""Lifecycle tables as data, validated when they are built."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from esper.statemachines.errors import TableError


@dataclass(frozen=True)
class Edge:
    """One row of a transition table: ``trigger`` moves any of ``sources`` to ``dest``."""

    trigger: str
    sources: tuple[str, ...]
    dest: str
    gate: str | None = None
    note: str = ""


@dataclass(frozen=True)
class LifecycleTable:
    """A lifecycle: states with contract values, an initial state, terminal states and edges."""

    name: str
    states: tuple[tuple[str, int, str], ...]  # (name, value, meaning)
    initial: str
    terminal: frozenset[str]
    edges: tuple[Edge, ...]
    enum: type[IntEnum] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        validate(self)
        members = [(n, v) for n, v, _ in self.states]
        object.__setattr__(self, "enum", IntEnum(self.name.title() + "State", members))

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(n for n, _, _ in self.states)

    @property
    def triggers(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for e in self.edges:
            seen.setdefault(e.trigger, None)
        return tuple(seen)

    def value_of(self, state: str) -> int:
        return dict((n, v) for n, v, _ in self.states)[state]

    def destination(self, state: str, trigger: str) -> str | None:
        """Where ``trigger`` leads from ``state``, or None when it is illegal there."""
        for e in self.edges:
            if e.trigger == trigger and state in e.sources:
                return e.dest
        return None

    def edge(self, state: str, trigger: str) -> Edge | None:
        for e in self.edges:
            if e.trigger == trigger and state in e.sources:
                return e
        return None

    def legal_triggers(self, state: str) -> tuple[str, ...]:
        return tuple(e.trigger for e in self.edges if state in e.sources)

    def to_dict(self) -> dict[str, object]:
        """JSON-ready description used by docs, the CLI and tests."""
        return {
            "name": self.name,
            "initial": self.initial,
            "terminal": sorted(self.terminal, key=self.value_of),
            "states": [{"name": n, "value": v, "meaning": m} for n, v, m in self.states],
            "transitions": [
                {"trigger": e.trigger, "from": list(e.sources), "to": e.dest, "gate": e.gate, "note": e.note}
                for e in self.edges
            ],
            "gates": sorted({e.gate for e in self.edges if e.gate}),
        }


def validate(table: LifecycleTable) -> None:
    """Check a table's internal consistency; raise TableError naming the first problem."""
    names = [n for n, _, _ in table.states]
    values = [v for _, v, _ in table.states]
    if len(set(names)) != len(names):
        raise TableError(f"{table.name}: duplicate state names {names}")
    if len(set(values)) != len(values):
        raise TableError(f"{table.name}: duplicate state values {values}")
    known = set(names)
    if table.initial not in known:
        raise TableError(f"{table.name}: initial state {table.initial!r} is not a state")
    if not table.terminal <= known:
        raise TableError(f"{table.name}: unknown terminal states {sorted(table.terminal - known)}")
    pairs: set[tuple[str, str]] = set()
    for e in table.edges:
        for s in (*e.sources, e.dest):
            if s not in known:
                raise TableError(f"{table.name}: edge {e.trigger!r} names unknown state {s!r}")
        for s in e.sources:
            if (s, e.trigger) in pairs:
                raise TableError(f"{table.name}: trigger {e.trigger!r} is ambiguous from {s}")
            pairs.add((s, e.trigger))
            if s in table.terminal:
                raise TableError(f"{table.name}: terminal state {s} has exit {e.trigger!r}")
    for s in names:
        if s not in table.terminal and not any(s in e.sources for e in table.edges):
            raise TableError(f"{table.name}: non-terminal state {s} has no exit")
    reached = {table.initial}
    queue = deque([table.initial])
    while queue:
        cur = queue.popleft()
        for e in table.edges:
            if cur in e.sources and e.dest not in reached:
                reached.add(e.dest)
                queue.append(e.dest)
    if reached != known:
        raise TableError(f"{table.name}: unreachable states {sorted(known - reached)}")
