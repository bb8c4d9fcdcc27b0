"""Parameter ownership (Kasmina #19, #20): who owns which trained parameter, the host or exactly one seed.

Checked on every optimizer rebuild: a user blueprint that reuses host parameters is a conflict, never silently
trained twice.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn


@dataclass(frozen=True)
class OwnershipIssue:
    """One problem found by :meth:`ParameterOwnership.validate`."""

    kind: Literal["conflict", "unregistered"]
    param_name: str
    owners: tuple[str, ...]


@dataclass
class _Owned:
    param: torch.Tensor  # kept alive so its id() cannot be reused by another tensor
    owners: list[str] = field(default_factory=list)


class ParameterOwnership:
    """Who owns which parameter: the host, and each seed that claims some. Thread-safe."""

    HOST = "host"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owned: dict[int, _Owned] = {}

    def register_host(self, module: nn.Module) -> None:
        """(Re-)register the host: every earlier claim is forgotten, then the host owns all its parameters."""
        with self._lock:
            self._owned = {}
            for p in module.parameters():
                self._owned[id(p)] = _Owned(p, [self.HOST])

    def claim(self, owner: str, params: Iterable[torch.Tensor]) -> None:
        """Record ``owner`` as an owner of ``params``; a second owner makes a conflict (see validate)."""
        with self._lock:
            for p in params:
                rec = self._owned.setdefault(id(p), _Owned(p))
                if owner not in rec.owners:
                    rec.owners.append(owner)

    def owners(self, param: torch.Tensor) -> tuple[str, ...]:
        """The owners recorded for ``param`` (empty when unregistered)."""
        with self._lock:
            rec = self._owned.get(id(param))
            return tuple(rec.owners) if rec is not None else ()

    def validate(self, params: Iterable[tuple[str, torch.Tensor]]) -> list[OwnershipIssue]:
        """Check named parameters (e.g. ``model.named_parameters()``): unregistered ones and conflicts."""
        issues: list[OwnershipIssue] = []
        with self._lock:
            for name, p in params:
                rec = self._owned.get(id(p))
                if rec is None or not rec.owners:
                    issues.append(OwnershipIssue("unregistered", name, ()))
                elif len(rec.owners) > 1:
                    issues.append(OwnershipIssue("conflict", name, tuple(rec.owners)))
        return issues
