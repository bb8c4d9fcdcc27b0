"""Typed errors raised by lifecycle machines."""

from __future__ import annotations

from typing import Any


class LifecycleError(Exception):
    """Base class for every lifecycle failure."""


class TableError(LifecycleError):
    """A lifecycle table is inconsistent (raised at import time)."""


class IllegalTransition(LifecycleError):
    """A trigger is not allowed from the subject's current state; the state is unchanged."""

    def __init__(self, machine: str, subject: str, state: str, trigger: str, detail: str = "") -> None:
        self.machine = machine
        self.subject = subject
        self.state = state
        self.trigger = trigger
        self.detail = detail
        msg = f"{machine} {subject!r}: trigger {trigger!r} is not allowed from state {state}"
        super().__init__(f"{msg} ({detail})" if detail else msg)


class GateRejected(LifecycleError):
    """A gate guarding a requested trigger did not pass; the state is unchanged."""

    def __init__(self, machine: str, subject: str, state: str, trigger: str, result: Any) -> None:
        self.machine = machine
        self.subject = subject
        self.state = state
        self.trigger = trigger
        self.result = result
        super().__init__(
            f"{machine} {subject!r}: {trigger!r} from {state} rejected by gate "
            f"{getattr(result, 'gate', '?')}: {getattr(result, 'reason', result)}"
        )
