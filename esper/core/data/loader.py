"""How the loop reads a task: a ``torch.utils.data.DataLoader`` over a batch sampler whose order is a pure
function of (run seed, epoch) and that starts at any batch, so resume and rollback replay exactly (C-4, H-3).

Batch ``k`` of epoch ``e`` is always the same samples: slice ``k`` of :func:`epoch_order` ``(n, seed, e)``. The
sampler decides the order in the trainer's process; with ``data.num_workers`` the workers only fetch, and
each worker's RNGs (torch, random, numpy) are seeded by torch from the loader's generator, itself seeded from
(seed, epoch): worker ``w`` of epoch ``e`` always starts from the same state.

:class:`BatchSkips` is the Stateful record of batches never to train on again (H-6).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler, Subset

from esper.core.config import DataConfig
from esper.core.data.task import Task, collate
from esper.core.dist.world import current
from esper.core.errors import ConfigError
from esper.core.model import rng


class DataShardError(ConfigError):
    """A global batch too small to give every rank a sample."""


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume replays it exactly."""
    gen = torch.Generator().manual_seed(rng.derive(seed * 1_000_003, epoch))
    return torch.randperm(n, generator=gen)


def steps_per_epoch(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches in one epoch of ``n`` samples."""
    return n // batch_size if drop_last else (n + batch_size - 1) // batch_size


def _worker_seed(seed: int, epoch: int) -> int:
    # a different stream from epoch_order's, so the workers' RNGs are not the permutation's generator
    return (rng.derive(seed * 1_000_003, epoch) ^ 0x5DEECE66D) & 0x7FFF_FFFF_FFFF_FFFF


class EpochBatches(Sampler[list[int]]):
    """The batches of one epoch from batch ``start`` on, leaving out the batch indices in ``skip``."""

    def __init__(self, n: int, batch_size: int, drop_last: bool, seed: int, epoch: int, start: int = 0,
                 skip: frozenset[int] = frozenset(), shard: tuple[int, int] = (0, 1)) -> None:
        self.n, self.batch_size, self.drop_last = n, batch_size, drop_last
        self.seed, self.epoch, self.start, self.skip = seed, epoch, start, skip
        self.rank, self.ranks = shard  # this rank takes its contiguous share of every global batch

    @property
    def positions(self) -> list[int]:
        """The batch indices this sampler yields, in order."""
        total = steps_per_epoch(self.n, self.batch_size, self.drop_last)
        return [k for k in range(self.start, total) if k not in self.skip]

    def __iter__(self) -> Iterator[list[int]]:
        order = epoch_order(self.n, self.seed, self.epoch).tolist()
        for k in self.positions:
            batch = order[k * self.batch_size:(k + 1) * self.batch_size]
            if self.ranks > 1:
                # equal shards of a full batch (batch_size divides by the world size); a short last batch
                # (drop_last = false) is split as evenly as it goes, the gradient weights follow the sizes
                size, extra = divmod(len(batch), self.ranks)
                lo = self.rank * size + min(self.rank, extra)
                batch = batch[lo:lo + size + (self.rank < extra)]
                if not batch:
                    raise DataShardError(f"epoch {self.epoch} batch {k} has {len(batch)} samples: fewer than "
                                         f"the {self.ranks} ranks (set data.drop_last = true)")
            yield batch

    def __len__(self) -> int:
        return len(self.positions)


def _loader(ds: Any, cfg: DataConfig, pin: bool, generator: torch.Generator, **sampling: Any) -> DataLoader[Any]:
    # the generator is always explicit: without one the DataLoader draws its worker base seed from the global
    # RNG, which would move the run's checkpointed RNG state
    return DataLoader(ds, collate_fn=collate, num_workers=cfg.num_workers, pin_memory=pin, generator=generator,
                      **sampling)


def train_batches(task: Task, cfg: DataConfig, seed: int, epoch: int, start: int, skip: frozenset[int],
                  pin: bool = False) -> DataLoader[Any]:
    """The loader of epoch ``epoch`` from batch ``start`` on, less the batches in ``skip``; under torchrun,
    this rank's shard of each (global) batch."""
    world = current()
    sampler = EpochBatches(len(task.train), cfg.batch_size, cfg.drop_last, seed, epoch, start, skip,  # type: ignore[arg-type]
                           (world.rank, world.size))
    gen = torch.Generator().manual_seed(_worker_seed(seed, epoch))
    return _loader(task.train, cfg, pin, gen, batch_sampler=sampler)


def val_batches(task: Task, cfg: DataConfig, pin: bool = False, shard: tuple[int, int] = (0, 1)) -> DataLoader[Any]:
    """The validation set in its own order, in batches of ``data.eval_batch_size``; with ``shard=(rank, size)``
    rank ``rank``'s contiguous share of it (its sums are all-reduced by the caller)."""
    rank, size = shard
    ds: Any = task.val
    if size > 1:
        n = len(ds)  # type: ignore[arg-type]
        ds = Subset(ds, range(rank * n // size, (rank + 1) * n // size))
    return _loader(ds, cfg, pin, torch.Generator().manual_seed(0), batch_size=cfg.eval_batch_size,
                   shuffle=False, drop_last=False)


@dataclass(frozen=True)
class SkippedBatch:
    """A batch the run never trains on again: batch ``step`` of ``epoch`` (0-based, as in ``EPOCH:STEP``)."""

    epoch: int
    step: int
    cause: str
    global_step: int

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "cause": self.cause, "global_step": self.global_step}


class BatchSkips:
    """The batches to leave out of every replay (H-6): after an ELEVATED rollback for a loss spike or a
    non-finite loss, the batch that raised it. A Stateful part (manifest key ``data``); it records the incident,
    so a rollback keeps it, and a resume from any later checkpoint skips the same batches."""

    # a checkpoint written before H-6 has no ``data`` key: it had skipped no batch
    ABSENT: dict[str, Any] = {"skipped": []}

    def __init__(self) -> None:
        self.skipped: list[SkippedBatch] = []

    def add(self, epoch: int, step: int, cause: str, global_step: int) -> SkippedBatch:
        entry = SkippedBatch(epoch, step, cause, global_step)
        if all((s.epoch, s.step) != (epoch, step) for s in self.skipped):
            self.skipped.append(entry)
        return entry

    def steps(self, epoch: int) -> frozenset[int]:
        return frozenset(s.step for s in self.skipped if s.epoch == epoch)

    def cause(self, epoch: int, step: int) -> SkippedBatch:
        return next(s for s in self.skipped if (s.epoch, s.step) == (epoch, step))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": [s.to_dict() for s in self.skipped]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = [SkippedBatch(int(s["epoch"]), int(s["step"]), str(s["cause"]), int(s["global_step"]))
                        for s in state["skipped"]]
