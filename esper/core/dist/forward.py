"""Other ranks' warnings and CRITICAL events in the run's own ``events.jsonl``.

Rank K (> 0) writes every event to ``RUN/rank-K/events.jsonl``; its WARNING, ERROR and CRITICAL records are also
kept in its :class:`Outbox` and travel with the lifecycle fingerprint that every rank all-gathers at each
epoch's end (no collective of their own). Rank 0 writes each one as a ``rank.forwarded`` event at its own level:
its attributes are a :class:`ForwardedEvent` (``rank``, the original event's ``name`` and ``origin`` (its
source), and its ``seq``, ``utc``, ``epoch``, ``step`` and ``attributes`` in rank K's file). A distinct event name, not the original one, because readers (``watch``, ``plot``,
``runs``) act on event names and rank K's copy of an emergency every rank agreed on must not count twice.

What a rank records after the last fingerprint (or when it dies between two) reaches no collective: rank 0's
``summary.json`` lists every ``rank-K/`` file (``world.ranks``) so it is found from the run directory.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from esper.core.records.telemetry import Emitter

LEVELS = frozenset({"WARNING", "ERROR", "CRITICAL"})
EVENT = "rank.forwarded"
DROPPED = "rank.forward_dropped"
LIMIT = 256  # records kept per epoch and rank; past it they are counted (the rank's own file has them all)


@dataclass(frozen=True)
class ForwardedEvent:
    """One record of rank ``rank``'s events file, as rank 0's ``rank.forwarded`` attributes carry it."""

    rank: int
    name: str
    origin: str
    level: str  # the forwarded record's own level (not among its attributes)
    seq: int
    utc: str
    epoch: int | None
    step: int | None
    attributes: dict[str, Any]

    @classmethod
    def of(cls, rank: int, record: dict[str, Any]) -> ForwardedEvent:
        return cls(rank, record["event"], record["source"], record["level"], record["seq"], record["utc"],
                   record["epoch"], record["step"], record["attributes"])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ForwardedEvent:
        return cls(**d)

    def to_attributes(self) -> dict[str, Any]:
        """The ``rank.forwarded`` event's attributes."""
        return {k: v for k, v in self.to_dict().items() if k != "level"}


class Outbox:
    """Rank K's WARNING/ERROR/CRITICAL records since the last fingerprint (subscribed to its emitter)."""

    def __init__(self, rank: int, limit: int = LIMIT) -> None:
        self.rank = rank
        self.limit = limit
        self.records: list[ForwardedEvent] = []
        self.dropped = 0

    def __call__(self, record: dict[str, Any]) -> None:
        if record["level"] not in LEVELS:
            return
        if len(self.records) >= self.limit:
            self.dropped += 1
            return
        self.records.append(ForwardedEvent.of(self.rank, record))

    def drain(self) -> tuple[list[dict[str, Any]], int]:
        """What to send with the next fingerprint (plain dicts: they are pickled for the all-gather)."""
        out, dropped = [r.to_dict() for r in self.records], self.dropped
        self.records, self.dropped = [], 0
        return out, dropped


_outbox: Outbox | None = None


def collect(emitter: Emitter, rank: int) -> Outbox:
    """Keep this rank's warnings and CRITICAL events for rank 0 (a rank > 0 calls this once, on its emitter)."""
    global _outbox
    _outbox = Outbox(rank)
    emitter.subscribe(_outbox)
    return _outbox


def outgoing() -> tuple[list[dict[str, Any]], int]:
    """This rank's records for rank 0 since the last call (none on rank 0 or when nothing collects)."""
    return _outbox.drain() if _outbox is not None else ([], 0)
