"""Two-tier rollback (C-6): an in-memory last-known-good snapshot, and the last verified checkpoint.

The fast tier copies tensors into buffers allocated once (re-allocated only when the set of tensors or a shape
changes, e.g. after a germination) and restores by copying back in place, so a rollback costs about one
memcpy of the state. The full tier loads the last verified checkpoint through the same restore code as a
resume. Every rollback reports its tier, latency and SLA.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from esper.core import rng
from esper.core.checkpoint import load_checkpoint
from esper.core.errors import EsperError
from esper.core.tolaria.state import Position, capture, restore, restore_json

if TYPE_CHECKING:
    from esper.core.tolaria.trainer import Trainer


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


class RollbackManager:
    """Owns the last-known-good snapshot and runs rollbacks, fast tier first."""

    def __init__(self, trainer: Trainer) -> None:
        self.tr = trainer
        self.cfg = trainer.cfg.rollback
        self.snapshot = FastSnapshot()
        self.payload: dict[str, Any] | None = None
        self.position: Position | None = None

    def take(self, pos: Position) -> None:
        """Snapshot the trainer at a healthy epoch boundary."""
        self.snapshot.capture(live_tensors(self.tr))
        _, payload = capture(self.tr, pos, "snapshot", with_tensors=False)
        self.payload = json.loads(json.dumps(payload))  # a private copy: later mutation of the trainer can't leak in
        self.position = pos

    def rollback(self, reason: str) -> RollbackResult:
        """Restore last-known-good: fast tier, falling through to the full tier if it fails."""
        t0 = time.monotonic()
        fell_through = None
        try:
            how = self._fast()
            tier, sla = "fast", self.cfg.fast_sla_ms
        except (RollbackError, RuntimeError, KeyError) as exc:
            fell_through = f"{type(exc).__name__}: {exc}"
            self.tr.emit("tolaria", "rollback.fast_failed", "ERROR", error=fell_through)
            how = self._full()
            tier, sla = "full", self.cfg.full_sla_ms
        t1 = time.monotonic()
        latency = (t1 - t0) * 1000.0
        missed = None if latency <= sla else t0 * 1000.0 + sla
        assert self.position is not None
        return RollbackResult(tier, latency, sla, missed is None, missed, asdict(self.position), reason, how,
                              fell_through)

    def _fast(self) -> str:
        if self.payload is None or self.position is None:
            raise RollbackError("no last-known-good snapshot yet")
        structure = [(r["slot"], r["blueprint"], r["stage"]) for r in self.payload["seeds"]]
        live = [(s.name, s.blueprint, s.stage) for s in self.tr.kasmina.slots.values()]
        if structure == live:
            try:
                self.snapshot.restore_into(live_tensors(self.tr))
                restore_json(self.tr, copy.deepcopy(self.payload), rollback=True)
                return "in_place"
            except StructureChanged:
                pass  # the optimizer gained state since the snapshot: rebuild it from the buffers below
        tensors = split_tensors(self.snapshot.buffers)
        restore(self.tr, tensors, copy.deepcopy(self.payload), rollback=True)
        return "structural"

    def _full(self) -> str:
        path = self.tr.last_checkpoint
        if path is None:
            raise RollbackError("fast tier failed and there is no verified checkpoint to fall back to")
        loaded = load_checkpoint(Path(path))
        pos = restore(self.tr, loaded.tensors, loaded.payload, rollback=True)
        self.position = pos
        return str(loaded.path)


def live_tensors(tr: Trainer) -> dict[str, torch.Tensor]:
    """Every tensor of the training state, by a stable name (parameters, buffers, optimizer state)."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tr.host.state_dict(keep_vars=True).items():
        out[f"model/host.{k}"] = v.data if isinstance(v, torch.nn.Parameter) else v
    for s in tr.kasmina.slots.values():
        if s.module is not None:
            for k, v in s.module.state_dict(keep_vars=True).items():
                out[f"model/seed.{s.name}.{k}"] = v.data if isinstance(v, torch.nn.Parameter) else v
    index = 0
    for group in tr.optimizer.param_groups:
        for p in group["params"]:
            for key, value in tr.optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer/{index}.{key}"] = value
            index += 1
    return out


def split_tensors(flat: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """``stem/key`` names back into the per-file layout ``state.restore`` takes (cloned: restore may keep them)."""
    out: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}, "rng": {"torch": rng.get_state()}}
    for name, t in flat.items():
        stem, _, key = name.partition("/")
        out[stem][key] = t.clone()
    return out


