"""Operator signals (SPEC C-5): the first SIGINT/SIGTERM asks the run to stop after the current step with a
checkpoint; a second SIGINT aborts at once (checkpoints are atomic, so ``latest`` still verifies)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class StopRequest:
    """Set by the signal handler, read by the loop at each step boundary."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.settled = False  # summary.json is written: the outcome is decided, a signal changes nothing now

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else "signal"


@contextmanager
def graceful_signals(stop: StopRequest) -> Iterator[None]:
    """Route SIGINT/SIGTERM to ``stop`` while the block runs (main thread only: elsewhere, handlers can't be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: FrameType | None) -> None:
        if stop.settled:
            return  # a second SIGINT here would turn a written COMPLETED into exit 130 without its outcome lines
        if stop.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signal = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
