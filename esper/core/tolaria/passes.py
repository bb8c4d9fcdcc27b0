"""The data passes of a run: an epoch's training batches (with the skip record and the faults due at each step)
and the validation pass (also the counterfactual one, with slots bypassed)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch

from esper.core.config import DataConfig
from esper.core.data import train_batches, val_batches
from esper.core.errors import EsperError
from esper.core.io import bounded
from esper.core.kasmina import Mode
from esper.core.records.telemetry import Emitter
from esper.core.tolaria.builder import Parts
from esper.core.tolaria.compute import layout_key
from esper.core.tolaria.injector import DataLoaderError


def epoch_batches(p: Parts, cfg: DataConfig, seed: int, epoch: int, start: int, emitter: Emitter,
                  emit: Callable[..., Any]) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """The epoch's batches from batch ``start`` on; the faults due at each step are armed as it begins. A batch in
    the skip record is passed over (announced, never read): the position moves past it."""
    skipped = p.skips.steps(epoch)
    data = iter(train_batches(p.task, cfg, seed, epoch, start, skipped, p.pin_memory))
    try:
        for index in range(start, p.steps_per_epoch):
            emitter.set_context(epoch=epoch, step=p.state.global_step)
            if index in skipped:
                emit("tolaria", "batch.skipped", "WARNING", **p.skips.cause(epoch, index).to_dict(),
                     reason="it raised an ELEVATED rollback: left out of every replay")
                p.state.step_in_epoch = index + 1
                continue
            p.state.step_in_epoch = index  # the batch of this step (where a bad step's skip points)
            p.faults.arm(epoch, index, p.state.global_step)
            p.faults.before_batch(epoch, index)
            try:
                x, y = next(data)
            except EsperError:
                raise
            except Exception as exc:  # noqa: BLE001 - the user's dataset or loader, however it fails: a data error
                # (an OSError here is the dataset's read, never a run-directory write: not a disk fault)
                raise DataLoaderError(f"the training data raised {type(exc).__name__} reading batch {index} of "
                                      f"epoch {epoch}: {bounded.clip(str(exc), 300)}") from exc
            yield index, x, y
    finally:
        del data  # a loader's worker processes end with its iterator


@torch.no_grad()
def validate(p: Parts, cfg: DataConfig, bypass: frozenset[str]) -> dict[str, float]:
    """``val_loss`` and ``val_<metric>`` over the validation loader with the slots in ``bypass`` bypassed:
    sample-weighted means of the batch means. Under torchrun each rank evaluates its shard and the sums are
    all-reduced, so every rank has the same figures (and its gates decide alike). With ``trainer.ema`` the pass
    runs on the averaged weights, and the trained ones are back afterwards."""
    task = p.task
    sums = dict.fromkeys(["loss", *task.metrics], 0.0)
    seen = 0
    p.host.eval()
    try:
        with p.kasmina.modes(Mode.BYPASS, bypass), p.ema.applied() if p.ema is not None else nullcontext():
            for x, y in val_batches(task, cfg, p.pin_memory, (p.parallel.world.rank, p.parallel.world.size)):
                x, y = x.to(p.device, non_blocking=p.pin_memory), y.to(p.device, non_blocking=p.pin_memory)
                layout = layout_key(x, False, p.kasmina.slots.values(), bypass)
                with p.precision.autocast(), p.compute.phase("validation", layout):
                    out = p.kasmina.forward(x)
                n = len(y)
                sums["loss"] += float(task.loss(out, y)) * n
                for name, fn in task.metrics.items():
                    sums[name] += float(fn(out, y)) * n
                seen += n
    finally:
        p.host.train()
    *totals, count = p.parallel.sums([*sums.values(), float(seen)])
    return {f"val_{k}": v / count for k, v in zip(sums, totals, strict=True)}
