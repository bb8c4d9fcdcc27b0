"""One decision-maker in a world of several ranks: rank 0's controller worker decides, its reply (or its
failure) is broadcast, and every rank's Tamiyo adopts the same reply at the same epoch end, so the same commands
are validated and applied on every rank. In a world of one the run's own mediator is used, unchanged."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from esper.core.dist import World, broadcast, current
from esper.core.tolaria.mediator import ControllerCrashed, ControllerTimeout, Mediator

_FAILURES: dict[str, type[Exception]] = {"ControllerTimeout": ControllerTimeout,
                                         "ControllerCrashed": ControllerCrashed}


class RankMediator:
    """``decide`` on rank 0's mediator, broadcast to the other ranks (which run no controller worker)."""

    def __init__(self, mediator: Mediator | None, world: World) -> None:
        self.mediator = mediator
        self.world = world

    def decide(self, kind: str, payload: dict[str, Any]) -> Any:
        box: tuple[str, Any] | None = None
        if self.mediator is not None:
            try:
                box = ("ok", self.mediator.decide(kind, payload))
            except (ControllerTimeout, ControllerCrashed) as exc:
                box = (type(exc).__name__, str(exc))
        status, body = broadcast(box, self.world)
        if status == "ok":
            return body
        raise _FAILURES[status](body)  # the same failure, so every rank pauses at the same point

    def close(self) -> None:
        if self.mediator is not None:
            self.mediator.close()


def open_mediator(make: Callable[[], Mediator]) -> Mediator | RankMediator:
    """The run's mediator: its own in a world of one; rank 0's, shared by broadcast, in a larger world."""
    world = current()
    if not world.active:
        return make()
    return RankMediator(make() if world.writer else None, world)
