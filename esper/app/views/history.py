"""A run's story as its files tell it: the epoch rows, the sessions (a start, then any resumes, each with what it
planned), the seed lifecycle of every slot, emergencies, rollbacks and checkpoints, the slots and level now.

Built incrementally (``watch`` feeds it as the files grow) or at once (``plot``, ``runs``). What it reads was
written by a process that may have died mid-write, or by anyone: a field of the wrong type is ignored, never
trusted, and nothing here raises for what a record holds.

Where things sit on the epoch axis: epoch rows at their epoch (its end); an event at the epoch it happened in (the
event's ``epoch``, 0 before the first); a checkpoint at the epochs it holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from esper.statemachines import EMERGENCY, SEED

# Runs written before the task protocol (contract C1) recorded no task: every one of them was a classification.
DEFAULT_TASK: dict[str, Any] = {"name": None, "primary_metric": "val_accuracy", "direction": "max",
                                "metrics": ["val_loss", "val_accuracy"]}
START_EVENTS = ("run.started", "run.resuming")


def as_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def as_num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    return float(v) if math.isfinite(v) else None


def as_str(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def parse_utc(v: Any) -> datetime | None:
    if not isinstance(v, str) or len(v) > 64:
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


@dataclass
class Session:
    """One process's share of the run: from its start record to its last record."""

    kind: str
    utc: str
    epochs: int | None
    steps_per_epoch: int | None
    task: dict[str, Any] | None
    last_utc: str
    epoch_utcs: list[str] = field(default_factory=list)  # each epoch.completed of this session

    def duration_s(self) -> float | None:
        a, b = parse_utc(self.utc), parse_utc(self.last_utc)
        return (b - a).total_seconds() if a and b and b >= a else None


@dataclass(frozen=True)
class Transition:
    slot: str
    epoch: int
    source: str
    dest: str
    trigger: str


@dataclass(frozen=True)
class Marker:
    kind: str  # emergency | rollback | checkpoint
    epoch: int
    label: str
    level: str | None = None


class RunHistory:
    def __init__(self) -> None:
        self.rows: dict[int, dict[str, Any]] = {}
        self.sessions: list[Session] = []
        self.transitions: list[Transition] = []
        self.markers: list[Marker] = []
        self.slots: list[dict[str, Any]] = []
        self.level = EMERGENCY.initial
        self.finished: dict[str, Any] | None = None  # run.finished of the last session, once written
        self.first_utc: str | None = None
        self.stage: dict[str, str] = {}  # every slot's stage as the records tell it

    # ------------------------------------------------------------------ feeding
    def reset_metrics(self) -> None:
        self.rows.clear()

    def feed_metrics(self, records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add epoch rows (a later row for the same epoch replaces the earlier: a replay); returns the new ones."""
        added = []
        for row in records:
            epoch = as_int(row.get("epoch"))
            if epoch is None or epoch < 1:
                continue
            self.rows[epoch] = row
            added.append(row)
        return added

    def feed_events(self, records: Iterable[dict[str, Any]]) -> None:
        for rec in records:
            attrs = rec.get("attributes")
            event = rec.get("event")
            if not isinstance(attrs, dict) or not isinstance(event, str):
                continue
            utc = as_str(rec.get("utc"))
            epoch = as_int(rec.get("epoch")) or 0
            if utc is not None:
                self.first_utc = self.first_utc or utc
                if self.sessions:
                    self.sessions[-1].last_utc = utc
            handler = _HANDLERS.get(event)
            if handler is not None:
                handler(self, attrs, epoch, utc)

    def _start(self, kind: str, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        task = attrs.get("task")
        self.sessions.append(Session(kind, utc or "", as_int(attrs.get("epochs")), as_int(attrs.get("steps_per_epoch")),
                                     task if isinstance(task, dict) else None, utc or ""))
        self.finished = None

    def _epoch(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        if self.sessions and utc is not None:
            self.sessions[-1].epoch_utcs.append(utc)
        level = as_str(attrs.get("emergency_level"))
        if level in EMERGENCY.state_names:
            self.level = level
        slots = attrs.get("slots")
        if not isinstance(slots, list):
            return
        self.slots = [s for s in slots if isinstance(s, dict) and isinstance(s.get("slot"), str)]
        for s in self.slots:
            stage = as_str(s.get("stage"))
            known = self.stage.get(s["slot"], SEED.initial)
            if stage in SEED.state_names and stage != known:
                # the epoch's end says otherwise (a rollback restored the slot): the record wins
                self.transitions.append(Transition(s["slot"], epoch, known, stage, "restored"))
                self.stage[s["slot"]] = stage

    def _seed(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        t = attrs.get("transition")
        slot = as_str(attrs.get("slot"))
        if slot is None or not isinstance(t, dict):
            return
        source, dest = as_str(t.get("source")), as_str(t.get("dest"))
        if source not in SEED.state_names or dest not in SEED.state_names:
            return
        self.transitions.append(Transition(slot, epoch, source, dest, as_str(t.get("trigger")) or "?"))
        self.stage[slot] = dest

    def _level(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        to, frm = as_str(attrs.get("to_level")), as_str(attrs.get("from_level"))
        if to not in EMERGENCY.state_names:
            return
        self.level = to
        if frm in EMERGENCY.state_names and EMERGENCY.value_of(to) > EMERGENCY.value_of(frm):
            self.markers.append(Marker("emergency", epoch, to, to))

    def _rollback(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        tier = as_str(attrs.get("tier")) or "failed"
        self.markers.append(Marker("rollback", epoch, f"rollback ({tier})"))

    def _checkpoint(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        at = as_int(attrs.get("epoch"))
        self.markers.append(Marker("checkpoint", at if at is not None else epoch, as_str(attrs.get("reason")) or ""))

    def _finished(self, attrs: dict[str, Any], epoch: int, utc: str | None) -> None:
        self.finished = attrs

    # ------------------------------------------------------------------ reading
    @property
    def task(self) -> dict[str, Any]:
        for s in reversed(self.sessions):
            if s.task is not None and isinstance(s.task.get("primary_metric"), str) \
                    and s.task.get("direction") in ("max", "min"):
                return s.task
        return DEFAULT_TASK

    @property
    def primary(self) -> str:
        return str(self.task["primary_metric"])

    @property
    def planned_epochs(self) -> int | None:
        for s in reversed(self.sessions):
            if s.epochs is not None:
                return s.epochs
        return None

    @property
    def epochs_done(self) -> int:
        return max(self.rows, default=0)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for epoch in sorted(self.rows):
            v = as_num(self.rows[epoch].get(key))
            if v is not None:
                xs.append(epoch)
                ys.append(v)
        return xs, ys

    def final(self, key: str) -> float | None:
        return as_num(self.rows[self.epochs_done].get(key)) if self.rows else None

    def best(self, key: str, direction: str) -> tuple[float | None, int | None]:
        xs, ys = self.series(key)
        if not ys:
            return None, None
        i = ys.index(max(ys) if direction == "max" else min(ys))
        return ys[i], xs[i]

    def fossilized(self) -> int | None:
        if not self.rows:
            return None
        stages = self.rows[self.epochs_done].get("seeds_by_stage")
        return as_int(stages.get("FOSSILIZED", 0)) if isinstance(stages, dict) else None

    def slot_names(self) -> list[str]:
        names: list[str] = []
        for t in self.transitions:
            if t.slot not in names:
                names.append(t.slot)
        for s in self.slots:
            if s["slot"] not in names:
                names.append(s["slot"])
        return names

    def bands(self, end: float) -> dict[str, list[tuple[float, float, str]]]:
        """Per slot, the (from, to, stage) spans over epochs 0..``end`` that the transitions make."""
        out: dict[str, list[tuple[float, float, str]]] = {}
        for slot in self.slot_names():
            spans: list[tuple[float, float, str]] = []
            at, stage = 0.0, SEED.initial
            for t in (t for t in self.transitions if t.slot == slot):
                if t.epoch > at:
                    spans.append((at, float(t.epoch), stage))
                    at = float(t.epoch)
                stage = t.dest
            if end > at:
                spans.append((at, end, stage))
            out[slot] = spans
        return out

    def eta_s(self) -> float | None:
        """Seconds left at this session's mean pace per epoch (None until it has finished an epoch)."""
        planned = self.planned_epochs
        if not self.sessions or planned is None:
            return None
        s = self.sessions[-1]
        start, last = parse_utc(s.utc), parse_utc(s.epoch_utcs[-1]) if s.epoch_utcs else None
        if start is None or last is None or last <= start:
            return None
        per_epoch = (last - start).total_seconds() / len(s.epoch_utcs)
        return max(planned - self.epochs_done, 0) * per_epoch


_HANDLERS = {
    "run.started": lambda h, a, e, u: h._start("started", a, e, u),
    "run.resuming": lambda h, a, e, u: h._start("resuming", a, e, u),
    "epoch.completed": RunHistory._epoch,
    "seed.transition": RunHistory._seed,
    "emergency.level": RunHistory._level,
    "rollback.completed": RunHistory._rollback,
    "rollback.failed": RunHistory._rollback,
    "checkpoint.written": RunHistory._checkpoint,
    "run.finished": RunHistory._finished,
}
