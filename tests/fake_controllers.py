"""Tiny controllers for the mediator tests; the worker process imports them by ``module:function``."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


class _Stopped(Exception):  # noqa: N818 - control flow
    pass


class Counter:
    """Keeps its state in the payload: ``decide`` returns the incremented count and the child's pid."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"count": payload["count"] + self.step, "pid": os.getpid()}

    def late(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Answers only when the worker is told to stop (SIGTERM, caught): a reply that surely comes after the
        decision's deadline, and before the worker escalates to a kill."""
        def stop(_signum: int, _frame: object) -> None:
            raise _Stopped

        signal.signal(signal.SIGTERM, stop)
        try:
            while True:
                time.sleep(3600)
        except _Stopped:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return {"late": True, "pid": os.getpid()}

    def hang(self, payload: dict[str, Any]) -> dict[str, Any]:
        while True:
            time.sleep(3600)

    def boom(self, payload: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError(f"controller exploded on {payload!r}")


def make_counter(step: int = 1) -> Counter:
    return Counter(step)


def make_broken(**_: Any) -> Counter:
    raise ValueError("factory refuses to build")


class InlineNapper(Counter):
    """For the inline endpoint: naps without touching signal handlers (it runs in the test process)."""

    def nap(self, payload: dict[str, Any]) -> dict[str, Any]:
        time.sleep(payload["seconds"])
        return {"late": True}


def make_inline(step: int = 1) -> InlineNapper:
    return InlineNapper(step)


def make_slow_start(seconds: float, step: int = 1) -> InlineNapper:
    """A controller whose construction takes ``seconds`` (a model loading, a cold import): start-up, not a
    decision. Runs in the worker process or, for the inline endpoint, in the test process."""
    time.sleep(seconds)
    return InlineNapper(step)
