"""Tiny controllers for the mediator tests; the worker process imports them by ``module:function``."""

from __future__ import annotations

import os
import signal
import time
from typing import Any


class Counter:
    """Keeps its state in the payload: ``decide`` returns the incremented count and the child's pid."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        return {"count": payload["count"] + self.step, "pid": os.getpid()}

    def sleep(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Sleeps ``seconds`` with SIGTERM ignored, so its reply lands before the worker escalates to kill."""
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(payload["seconds"])
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
