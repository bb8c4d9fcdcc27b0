"""Data parallel over the world: the reductions one training step needs, and the checks that every rank still
holds the same network.

Why an all-reduce of every gradient in the optimizer's registered order, not ``DistributedDataParallel``:
Kasmina's slots are forward hooks on the host and TRAINING seeds take their own isolated backward passes
(``Kasmina.seed_passes``) after the host's, so one step runs more than one backward over a parameter set that
changes with every germinate, cull and fossilize. DDP's reducer fires during one backward and must be rebuilt
(and its buckets re-planned) at each structural change; a single coalesced all-reduce after all the step's
backward passes is exact for this loop and needs nothing rebuilt. A step makes two collectives (with
``trainer.accumulate_steps`` every batch of a window makes both, so every rank holds the same window): the small one
carries the loss, the batch size, the metrics, a stop request and a check that every rank registers the same
parameters (a mismatch is all-gathered and HALT naming the ranks); the other, the gradients with the seeds'
measured figures. On a small model each collective is a fixed cost (about 1.4 ms over loopback gloo on the
developers' 2-core VM): that is why there are two, not four.

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
        self._codes = (0, 0)  # two 16-bit pieces of the layout's digest
        self._agreed = True  # whether this step's batch() found every rank's layout alike
        self._weight = 1.0  # this rank's share of the global batch (its gradient's weight in the sum)

    @property
    def active(self) -> bool:
        return self.world.active

    def batch(self, loss: torch.Tensor, n: int, metrics: dict[str, float],
              named: Sequence[tuple[str, nn.Parameter]], stop: Any = None) -> tuple[float, int, dict[str, float]]:
        """The global batch's mean loss, size and metrics (sample-weighted over the ranks' shards), in one small
        all-reduce that also carries a stop request (one on any rank becomes one on every rank) and checks that
        every rank registers the same parameters (names, shapes, which are trained): two digests of that layout
        and their squares are summed, and the sums agree with one value only if every rank has it. A mismatch is
        all-gathered and HALT naming the ranks, before any gradient is summed."""
        if not self.active:
            return float(loss.detach()), n, metrics
        layout = tuple((name, tuple(p.shape), p.requires_grad) for name, p in named)
        if layout != self._layout:
            digest = _digest(layout)
            self._layout, self._codes = layout, (int(digest[:4], 16), int(digest[4:8], 16))
        asked = 1.0 if stop is not None and stop.requested else 0.0
        codes = [float(c) for c in self._codes]
        t = torch.tensor([float(loss.detach()) * n, float(n), asked, *(v * n for v in metrics.values()),
                          *codes, *(c * c for c in codes)], dtype=torch.float64)
        with collective("the step's all-reduce"):
            tdist.all_reduce(t)
        total = int(t[1])
        self._weight = n / total
        if t[2] > 0 and stop is not None and not stop.requested:
            stop.signal = signals.SIGTERM  # another rank was asked to stop: this one stops at the same step
        k, size = len(metrics), self.world.size
        sums, squares = t[3 + k:5 + k].tolist(), t[5 + k:7 + k].tolist()
        # 16-bit codes: every sum and square is exact in float64 for any world up to 2**10 ranks
        self._agreed = all(q * size == s * s for s, q in zip(sums, squares, strict=True)) or self.check_layout(layout)
        means = {name: float(t[3 + i] / t[1]) for i, name in enumerate(metrics)}
        return float(t[0] / t[1]), total, means

    def sums(self, values: list[float]) -> list[float]:
        """Every rank's ``values`` summed (float64), the same on every rank: a sharded pass's totals."""
        if not self.active:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        with collective("the validation all-reduce"):
            tdist.all_reduce(t)
        return t.tolist()

    def grads(self, named: Sequence[tuple[str, nn.Parameter]], measured: Sequence[float] = ()) -> list[float]:
        """Replace every gradient by the global batch's: the weighted sum over ranks, in the registered order
        (checked by this step's :meth:`batch`). A trained parameter without a gradient on some rank (a branch its
        shard did not reach) counts as zero there, as DDP's ``find_unused_parameters``; one without a gradient on
        every rank keeps none. ``measured`` (per-shard figures a gate reads: the seeds' losses and latencies)
        travel in the same all-reduce and come back as the global batch's sample-weighted means."""
        if not self.active:
            return list(measured)
        if tuple((name, tuple(p.shape), p.requires_grad) for name, p in named) != self._layout:
            raise RuntimeError("the gradients to reduce are not the parameters this step's batch() checked")
        if not self._agreed:
            return list(measured)  # never a collective over buffers that differ (the HALT has been raised)
        trained = [p for _, p in named if p.requires_grad]
        dtype = next((p.grad.dtype for p in trained if p.grad is not None), torch.float32)
        present = [1.0 if p.grad is not None else 0.0 for p in trained]
        flat = torch.cat([*(p.grad.reshape(-1) if p.grad is not None else torch.zeros(p.numel(), dtype=dtype)
                            for p in trained), torch.tensor(present + list(measured), dtype=dtype)])
        flat.mul_(self._weight)
        with collective("the gradient all-reduce"):
            tdist.all_reduce(flat)
        head = flat.numel() - len(present) - len(measured)  # the gradients, then who had them, then the figures
        offset = 0
        for p, had in zip(trained, flat[head:head + len(present)].tolist(), strict=True):
            part = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if had == 0.0:
                continue  # no rank had a gradient for it
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
        return flat[flat.numel() - len(measured):].tolist() if measured else []

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
