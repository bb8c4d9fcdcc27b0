"""Two-tier rollback (C-6): an in-memory last-known-good snapshot, and the last verified checkpoint.

The fast tier copies every tensor of the components' state into buffers allocated once (re-allocated only
when the set of tensors or a shape changes, e.g. after a germination) and keeps a private copy of their JSON
halves. It restores by copying the buffers back into the live tensors in place, so a rollback costs about one
memcpy of the state; when the live tensors no longer match (a seed came or went), the parts are rebuilt from
the buffers instead ("structural"). The full tier loads the last verified checkpoint through the same
component restore as a resume. Either way the parts that record the incident keep their live state, and the
controller is rewound. Every rollback reports its tier, latency and SLA.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from esper.core.checkpoint import load_checkpoint
from esper.core.config import RollbackConfig
from esper.core.errors import EsperError
from esper.core.tamiyo import Tamiyo
from esper.core.tolaria.components import Components, States
from esper.core.tolaria.train_state import Position, TrainState


class RollbackError(EsperError):
    """A rollback tier could not restore the state."""


class StructureChanged(RollbackError):
    """The live tensors no longer match the snapshot's (a seed appeared or left since it was taken)."""


class FastSnapshot:
    """Named tensors copied into preallocated buffers; restored by in-place copy."""

    def __init__(self) -> None:
        self.buffers: dict[str, torch.Tensor] = {}
        self.allocations = 0

    def capture(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for key in [k for k in self.buffers if k not in tensors]:
            del self.buffers[key]
        for key, value in tensors.items():
            buf = self.buffers.get(key)
            if buf is None or buf.shape != value.shape or buf.dtype != value.dtype or buf.device != value.device:
                buf = torch.empty_like(value, memory_format=torch.contiguous_format)
                self.buffers[key] = buf
                self.allocations += 1
            buf.copy_(value)

    def restore_into(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if tensors.keys() != self.buffers.keys():
            extra, missing = sorted(tensors.keys() - self.buffers.keys()), sorted(self.buffers.keys() - tensors.keys())
            raise StructureChanged(f"live state differs from the snapshot: new {extra[:5]}, gone {missing[:5]}")
        for key, live in tensors.items():
            buf = self.buffers[key]
            if live.shape != buf.shape:
                raise StructureChanged(f"{key}: shape {tuple(live.shape)} != snapshot {tuple(buf.shape)}")
        with torch.no_grad():
            for key, live in tensors.items():
                live.copy_(self.buffers[key])

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())


@dataclass(frozen=True)
class RollbackResult:
    tier: str  # "fast" | "full"
    latency_ms: float
    sla_ms: float
    within_sla: bool
    deadline_missed_at_ms: float | None  # monotonic ms at which the SLA deadline passed, when it was missed
    position: dict[str, int]
    reason: str
    path: str  # how the fast tier restored: "in_place" | "structural"; the checkpoint path for the full tier
    fell_through: str | None = None  # why the fast tier failed, when the full tier ran instead

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def live_tensors(components: Components) -> dict[str, torch.Tensor]:
    """Every tensor of the live training state by its stable name (``model/host.…``, ``optimizer/0.…``, …)."""
    return components.live_tensors()


class RollbackManager:
    """Owns the last-known-good snapshot and runs rollbacks, fast tier first."""

    def __init__(self, cfg: RollbackConfig, components: Components, state: TrainState, controller: Tamiyo | None,
                 last_checkpoint: Callable[[], Path | None], emit: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.components = components
        self.state = state
        self.controller = controller
        self.last_checkpoint = last_checkpoint
        self.emit = emit
        self.snapshot = FastSnapshot()
        self.values: States | None = None  # the JSON halves of last-known-good
        self.position: Position | None = None

    @property
    def has_snapshot(self) -> bool:
        return self.values is not None

    def take(self) -> None:
        """Snapshot the live state (a healthy epoch boundary, or the start)."""
        states = self.components.state_dict()
        self.snapshot.capture(self.components.flatten(states))
        self.values = self.components.values(states)
        self.position = self.state.position

    def rollback(self, reason: str) -> RollbackResult:
        """Restore last-known-good: fast tier, falling through to the full tier if it fails."""
        t0 = time.monotonic()
        fell_through = None
        try:
            how = self._fast()
            tier, sla = "fast", self.cfg.fast_sla_ms
        except (RollbackError, RuntimeError, KeyError) as exc:
            fell_through = f"{type(exc).__name__}: {exc}"
            self.emit("tolaria", "rollback.fast_failed", "ERROR", error=fell_through)
            how = self._full()
            tier, sla = "full", self.cfg.full_sla_ms
        if self.controller is not None:
            self.controller.rewind(self.state.epochs_done, "rollback to last-known-good")
        self.position = self.state.position
        t1 = time.monotonic()
        latency = (t1 - t0) * 1000.0
        missed = None if latency <= sla else t0 * 1000.0 + sla
        return RollbackResult(tier, latency, sla, missed is None, missed, asdict(self.position), reason, how,
                              fell_through)

    def _fast(self) -> str:
        if self.values is None:
            raise RollbackError("no last-known-good snapshot yet")
        live = live_tensors(self.components)
        try:
            self.snapshot.restore_into(live)
        except StructureChanged:
            # a seed came or went since the snapshot: the parts rebuild from the buffers (and copy them)
            self.components.load_state_dict(self.structural_states(), rollback=True)
            return "structural"
        # the live tensors hold last-known-good now; the parts take them back (no-op copies) with the JSON halves
        self.components.load_state_dict(self.components.unflatten(live, self.values), rollback=True)
        return "in_place"

    def structural_states(self) -> States:
        """The snapshot as per-part states over its buffers (for parts to copy from, never to keep)."""
        assert self.values is not None
        return self.components.unflatten(self.snapshot.buffers, self.values)

    def _full(self) -> str:
        path = self.last_checkpoint()
        if path is None:
            raise RollbackError("fast tier failed and there is no verified checkpoint to fall back to")
        loaded = load_checkpoint(path)
        self.components.load_state_dict(self.components.from_checkpoint(loaded.tensors, loaded.payload),
                                        rollback=True)
        return str(loaded.path)
