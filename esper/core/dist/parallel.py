"""Data parallel over the world: the reductions one training step needs, and the checks that every rank still
holds the same network.

Why an all-reduce of every gradient in the optimizer's registered order, not ``DistributedDataParallel``:
Kasmina's slots are forward hooks on the host and TRAINING seeds take their own isolated backward passes
(``Kasmina.seed_passes``) after the host's, so one step runs more than one backward over a parameter set that
changes with every germinate, cull and fossilize. DDP's reducer fires during one backward and must be rebuilt
(and its buckets re-planned) at each structural change; a single coalesced all-reduce after all the step's
backward passes is exact for this loop, costs one gradient collective per step and needs nothing rebuilt: the
registered order (names + shapes + which have a gradient) is compared across ranks at every step by a one-integer
all-reduce of its digest, and a mismatch is all-gathered and HALT naming the ranks.

Emergencies agree by construction: the step's loss is reduced before it is checked (a NaN on any rank is a NaN
in the sum on every rank) and the gradient is reduced before ``check_grads`` reads it, so every rank sees the same
signal at the same step and skips or rolls back with the others. A stop request rides on the loss reduction.

Every collective is skipped in a world of one: a single-process run computes exactly what it did before.
"""

from __future__ import annotations

import hashlib
import signal as signals
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from esper.core.dist import forward
from esper.core.dist.world import World, collective, current, gather

# the parts of a slot's record that must agree across ranks (timestamps and latencies may differ)
FINGERPRINT_KEYS = ("slot", "stage", "alpha", "blueprint", "seed_id")
Halt = Callable[[str, str, dict[str, Any]], None]  # (cause, detail, attributes): the caller's HALT
Emit = Callable[..., Any]  # the run's emit(source, event, level, **attributes)


def _digest(obj: Any) -> str:
    return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]


def weights_digest(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    h = hashlib.sha256()
    for name, p in named:
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def disagreeing(values: list[Any]) -> list[int]:
    """The ranks whose value differs from rank 0's."""
    return [r for r, v in enumerate(values) if v != values[0]]


class DataParallel:
    """One rank's share of data-parallel training (a no-op in a world of one)."""

    def __init__(self, halt: Halt, world: World | None = None, emit: Emit | None = None) -> None:
        self.world = world or current()
        self.halt = halt
        self.emit = emit
        self._layout: tuple[Any, ...] | None = None
        self._code = 0  # the layout's digest as an integer (60 bits)
        self._weight = 1.0  # this rank's share of the global batch (its gradient's weight in the sum)

    @property
    def active(self) -> bool:
        return self.world.active

    def loss(self, loss: torch.Tensor, n: int, stop: Any = None) -> tuple[float, int]:
        """The global batch's mean loss and size (sample-weighted over the ranks' shards); a stop request on any
        rank becomes one on every rank."""
        if not self.active:
            return float(loss.detach()), n
        asked = 1.0 if stop is not None and stop.requested else 0.0
        t = torch.tensor([float(loss.detach()) * n, float(n), asked], dtype=torch.float64)
        with collective("the loss all-reduce"):
            tdist.all_reduce(t)
        total = int(t[1])
        self._weight = n / total
        if t[2] > 0 and stop is not None and not stop.requested:
            stop.signal = signals.SIGTERM  # another rank was asked to stop: this one stops at the same step
        return float(t[0] / t[1]), total

    def metrics(self, values: dict[str, float], n: int) -> dict[str, float]:
        """Sample-weighted means of per-shard metrics over the global batch."""
        if not self.active or not values:
            return values
        t = torch.tensor([v * n for v in values.values()] + [float(n)], dtype=torch.float64)
        with collective("the metrics all-reduce"):
            tdist.all_reduce(t)
        return {k: float(t[i] / t[-1]) for i, k in enumerate(values)}

    def sums(self, values: list[float]) -> list[float]:
        """Every rank's ``values`` summed (float64), the same on every rank: a sharded pass's totals."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        with collective("the validation all-reduce"):
            tdist.all_reduce(t)
        return t.tolist()

    def grads(self, named: Sequence[tuple[str, nn.Parameter]], measured: Sequence[float] = ()) -> list[float]:
        """Replace every gradient by the global batch's: the weighted sum over ranks, in the registered order.
        ``measured`` (per-shard figures a gate reads: the seeds' losses and latencies) travel in the same
        all-reduce and come back as the global batch's sample-weighted means, equal on every rank."""
        if not self.active:
            return list(measured)
        layout = tuple((name, tuple(p.shape), p.grad is not None) for name, p in named)
        if layout != self._layout:
            self._layout, self._code = layout, int(_digest(layout)[:15], 16)
        # every step, on every rank (a rank whose layout alone changed must not wait in a collective the others
        # never enter): max and -min of the layout digests agree only if every rank has the same one
        codes = torch.tensor([self._code, -self._code], dtype=torch.int64)
        with collective("the parameter layout all-reduce"):
            tdist.all_reduce(codes, op=tdist.ReduceOp.MAX)
        if int(codes[0]) != -int(codes[1]) and not self.check_layout(layout):
            return list(measured)  # never a collective over buffers that differ (the HALT has been raised)
        grads = [p.grad for _, p in named if p.grad is not None]
        if not grads and not measured:
            return []
        # one collective: the figures ride in the gradients' buffer (their dtype: only equality across ranks matters)
        dtype = grads[0].dtype if grads else torch.float32
        extra = torch.tensor(list(measured), dtype=dtype)
        flat = torch.cat([*(g.reshape(-1) for g in grads), extra]).mul_(self._weight)
        with collective("the gradient all-reduce"):
            tdist.all_reduce(flat)
        extra = flat[flat.numel() - len(measured):]
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return extra.tolist()

    def buffers(self, module: nn.Module) -> None:
        """Rank 0's buffers (BatchNorm statistics, ``num_batches_tracked``, any registered buffer) copied to every
        rank before the step's forward, as ``DistributedDataParallel(broadcast_buffers=True)`` does: each rank's
        forward updates them from its own shard, so without this the ranks drift apart unnoticed. One broadcast
        per dtype; nothing at all for a host without buffers or in a world of one."""
        if not self.active:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for b in module.buffers():
            by_dtype.setdefault(b.dtype, []).append(b)
        for dtype, bufs in by_dtype.items():
            flat = torch.cat([b.detach().reshape(-1) for b in bufs])
            with collective(f"the {dtype} buffer broadcast"):
                tdist.broadcast(flat, src=0)
            offset = 0
            with torch.no_grad():
                for b in bufs:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()

    def check_layout(self, layout: tuple[Any, ...]) -> bool:
        """Every rank registers the same parameters in the same order (after every structural change)."""
        digests = gather(_digest(layout), self.world)
        bad = disagreeing(digests)
        if bad:
            self.halt("rank_divergence", f"ranks {bad} register other parameters than rank 0 "
                      f"(digests {digests})", {"ranks": bad, "what": "parameters"})
        return not bad

    def fingerprint(self, records: list[dict[str, Any]], named: Sequence[tuple[str, nn.Parameter]],
                    buffers: Sequence[tuple[str, torch.Tensor]] = ()) -> dict[str, Any]:
        """This rank's lifecycle fingerprint: stages, alphas, blueprints, parameter count, a digest of every
        weight (fossilized seeds' included) and one of every host buffer."""
        slots = [{k: r.get(k) for k in FINGERPRINT_KEYS} for r in records]
        return {"slots": slots, "params": sum(p.numel() for _, p in named), "weights": weights_digest(named),
                "buffers": weights_digest(buffers)}

    def check_epoch(self, epoch: int, records: list[dict[str, Any]],
                    named: Sequence[tuple[str, nn.Parameter]], buffers: Sequence[tuple[str, torch.Tensor]] = ()
                    ) -> None:
        """All-gather the fingerprints at an epoch's end, with every rank's warnings and CRITICAL events since the
        last one (rank 0 writes them: ``esper.core.dist.forward``); any rank that differs from rank 0 is a HALT."""
        if not self.active:
            return
        sent = gather((self.fingerprint(records, named, buffers), forward.outgoing()), self.world)
        if self.world.writer and self.emit is not None:
            self._forward([out for _, out in sent])
        prints = [p for p, _ in sent]
        bad = disagreeing(prints)
        if bad:
            fields = sorted(k for r in bad for k in prints[0] if prints[r][k] != prints[0][k])
            self.halt("rank_divergence", f"epoch {epoch}: ranks {bad} differ from rank 0 in {sorted(set(fields))}",
                      {"ranks": bad, "what": sorted(set(fields)), "fingerprints": prints})

    def _forward(self, outboxes: list[tuple[list[dict[str, Any]], int]]) -> None:
        assert self.emit is not None
        for rank, (records, dropped) in enumerate(outboxes):
            for r in map(forward.ForwardedEvent.from_dict, records):
                self.emit("tolaria", forward.EVENT, r.level, **r.to_attributes())
            if dropped:
                self.emit("tolaria", forward.DROPPED, "WARNING", rank=rank, dropped=dropped,
                          file=f"rank-{rank}/events.jsonl")
