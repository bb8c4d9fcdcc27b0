"""A TRAINING seed's own step (T-5): the task loss with the seed substituted at its slot, gradients to the seed
only, the host's buffers and RNG streams left as the host's own step left them. Mixed into ``Kasmina``."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

import esper.core.kasmina.sandbox as sandbox
from esper.core.kasmina.distill import distill_loss
from esper.core.kasmina.slot import Mode, SeedSlot

if TYPE_CHECKING:
    from esper.core.kasmina.kasmina import Kasmina

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class SeedPasses:
    """The seeds' own passes of one training step; ``self`` is the run's ``Kasmina``."""

    def seed_passes(self: Kasmina, slots: list[SeedSlot], x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                    scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    teacher: torch.Tensor | None = None) -> list[float]:
        """Own steps of every TRAINING seed, each from the slot input this step's main forward produced
        (captured first: one seed's pass runs downstream hooks that would overwrite another's). ``scale``: the
        fp16 loss scaler's, so seed gradients are scaled like the host's; ``teacher``: the main forward's
        output, distilled into each seed's pass when ``seeds.distill`` is on.

        Returns each slot's loss and latency (ms), in order, *unrecorded*: under data parallel they are this
        rank's shard's, and G2 must judge the global batch's on every rank alike, so the trainer reduces them
        (with the gradients) and hands them to :meth:`record_seed_steps`."""
        inputs = {s.name: s.last_input for s in slots}
        teacher = teacher if self.scfg.distill.enabled else None
        measured: list[float] = []
        for slot in slots:
            t0 = time.perf_counter()
            loss = self.seed_pass(slot, x, y, loss_fn, h=inputs[slot.name], scale=scale, teacher=teacher,
                                  record=False)
            measured += [loss, (time.perf_counter() - t0) * 1000.0]
        return measured

    @staticmethod
    def record_seed_steps(slots: list[SeedSlot], measured: list[float]) -> None:
        """Add one step's seed losses and latencies (as :meth:`seed_passes` returned them, reduced over the
        ranks) to each TRAINING slot's epoch figures, which G2 reads."""
        for i, slot in enumerate(slots):
            slot.stats.loss_sum += measured[2 * i]
            slot.stats.loss_count += 1
            slot.stats.latency_ms_sum += measured[2 * i + 1]

    def seed_pass(self: Kasmina, slot: SeedSlot, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn,
                  h: torch.Tensor | None = None, scale: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  teacher: torch.Tensor | None = None, record: bool = True) -> float:
        """TRAINING seed's own step: task loss with the seed substituted; gradients go to the seed only. The
        host's buffers and the RNG streams are left as the host's own step left them (``sandbox``). ``record``:
        add the loss and latency to the slot's epoch figures (:meth:`seed_passes` leaves that to the trainer)."""
        t0 = time.perf_counter()
        with sandbox.untouched(self.host):
            if slot.resumable and h is not None:
                # the host activation at the slot is known from this step's forward: run only the layers after it
                h = h.detach()
                s = slot.seed_output(h)
                out = self.host.forward_from(slot.layer, slot.blend(h, s, 1.0, seed_input=h))
            else:
                with self.modes(Mode.SUBSTITUTE, [slot.name]):
                    out = self.forward(x)
            loss = loss_fn(out, y)  # G2 judges the task loss; distillation only shapes the gradient
            total = loss if teacher is None else loss + distill_loss(out, teacher, self.scfg.distill)
            params = slot.params()
            grads = torch.autograd.grad(total if scale is None else scale(total), params)
        for p, g in zip(params, grads, strict=True):  # the host's backward leaves a TRAINING seed's gradients alone
            p.grad = g if p.grad is None else p.grad.add_(g)  # an accumulation window's earlier batches
        value = float(loss.detach())
        if record:
            self.record_seed_steps([slot], [value, (time.perf_counter() - t0) * 1000.0])
        return value

