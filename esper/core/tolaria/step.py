"""One training batch and, at the end of its accumulation window, the optimizer step, with every safety check
(a part of :class:`~esper.core.tolaria.trainer.Trainer`, kept apart so the loop reads in one sitting)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from esper.core.config import EsperConfig
from esper.core.kasmina import SeedForwardError, SeedSlot
from esper.core.tolaria import records
from esper.core.tolaria.builder import Parts
from esper.core.tolaria.compute import layout_key
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.signals import StopRequest
from esper.core.tolaria.train_state import EpochStats


class Steps:
    """The trainer's step: what it reads of the trainer is declared here."""

    cfg: EsperConfig
    emit: Callable[..., Any]
    reporter: records.Reporter
    stop: StopRequest

    def _parts(self) -> Parts:
        raise NotImplementedError

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: EpochStats,
                   training_slots: list[SeedSlot] | None = None, index: int | None = None) -> bool:
        """One batch with every safety check; the optimizer steps at the end of its accumulation window (batch
        ``index`` of the epoch; without one, the batch is a window of its own). Returns whether it was taken."""
        t0 = time.perf_counter()
        p = self._parts()
        acc = p.accumulation
        size, last = (1, True) if index is None else acc.window(index, p.steps_per_epoch, p.skips.steps(p.state.epoch))
        if training_slots is None:
            training_slots = [s for s in p.kasmina.slots.values() if s.stage == "TRAINING"]
        if acc.left_open(index) and not self.close_window(p, stats, training_slots):
            return False
        p.safety.handle(p.faults.before_step(p.kasmina))
        x, y = x.to(p.device, non_blocking=p.pin_memory), y.to(p.device, non_blocking=p.pin_memory)
        task = p.task
        opt = p.optimizer.optimizer
        opt.zero_grad(set_to_none=True)  # this batch's gradients only: a window's sum is the accumulation's
        p.parallel.buffers(p.host)  # rank 0's BatchNorm statistics on every rank, as DDP's broadcast_buffers
        amp = p.precision
        layout = layout_key(x, True, p.kasmina.slots.values())  # what this step's FLOPs depend on
        try:
            with amp.autocast(), p.compute.phase("forward", layout):
                out = p.kasmina.forward(x)
                loss = p.faults.corrupt_loss(task.loss(out, y))
            with torch.no_grad():
                shard = {name: float(fn(out, y)) for name, fn in task.metrics.items()}
            # the global batch's loss and metrics under torchrun, in the step's one small collective
            value, n, metrics = p.parallel.batch(loss, len(y), shard, p.optimizer.named_params(), self.stop)
            bad = p.emergency.check_loss(value)  # a non-finite loss is an emergency in every precision
            if bad is not None:
                return self._bad_step(p, bad, stats)
            with p.compute.phase("backward", layout):
                amp.scale(loss).backward()
            with amp.autocast(), p.compute.phase("seeds", layout):
                measured = p.kasmina.seed_passes(training_slots, x, y, task.loss, scale=amp.scale,
                                                 teacher=out.detach())
        except SeedForwardError as exc:
            return self._bad_step(p, Signal("ELEVATED", "seed_forward_error", str(exc), {"slot": exc.slot}), stats,
                                  cull=exc.slot)
        p.faults.after_backward(p.host.parameters())
        # reduced while still scaled (every rank sees one overflow); the seeds' losses and latencies ride along, so
        # G2 judges the global batch's figures on every rank alike. In a window of several batches each batch is
        # reduced as it is taken, so every rank holds the same window (a checkpoint inside one resumes every rank)
        measured = p.parallel.grads(p.optimizer.named_params(), measured)
        if size > 1:
            assert index is not None  # a window of several batches is an epoch's
            acc.add(index, measured)
            measured = acc.close() if last else measured  # the window's mean gradient, in .grad
        if last and not self._optimizer_step(p, stats, training_slots, measured):
            return False
        p.emergency.accept_loss(value)
        ms = (time.perf_counter() - t0) * 1000.0
        stats.add(value, metrics, n, ms)
        p.compute.add_step_time(ms)
        every = self.cfg.telemetry.log_every_steps
        if last and every and p.state.global_step % every == 0:  # the loggers' per-step scalars
            self.emit("tolaria", "train.step", "INFO", global_step=p.state.global_step, train_loss=value,
                      lr=opt.param_groups[0]["lr"])
        self.reporter.step(stats.loss_sum / stats.seen)  # the epoch's running mean, not this batch's loss
        if ms > self.cfg.emergency.slow_step_ms:
            p.safety.handle(Signal("NOTICE", "slow_step", f"step took {ms:.0f} ms > "
                                   f"{self.cfg.emergency.slow_step_ms:.0f} ms", {"step_ms": ms}))
        return True

    def close_window(self, p: Parts, stats: EpochStats, training_slots: list[SeedSlot]) -> bool:
        """Step on a window left open (:meth:`Accumulation.left_open`); returns whether the step was applied."""
        return self._optimizer_step(p, stats, training_slots, p.accumulation.close())

    def _optimizer_step(self, p: Parts, stats: EpochStats, training_slots: list[SeedSlot],
                        measured: list[float]) -> bool:
        """The end of a window: its (reduced) gradients checked, clipped and applied; returns whether they were."""
        opt = p.optimizer.optimizer
        amp = p.precision
        p.kasmina.record_seed_steps(training_slots, measured)
        overflowed = amp.unscale(opt)  # fp16: the scaler skips this step; not an emergency
        bad = None if overflowed else p.emergency.check_grads(p.optimizer.named_params())
        if bad is not None:
            return self._bad_step(p, bad, stats)
        if self.cfg.trainer.grad_clip > 0 and not overflowed:
            torch.nn.utils.clip_grad_norm_([q for g in opt.param_groups for q in g["params"]],
                                           self.cfg.trainer.grad_clip)
        p.schedule.apply(opt, p.state.global_step)
        persistent = amp.step(opt, overflowed, p.state.global_step)  # fp16 overflows many steps in a row
        if persistent is not None:
            return self._bad_step(p, persistent, stats)
        p.state.global_step += 1
        if p.ema is not None:
            p.ema.update()
        if not p.safety.paused:
            p.kasmina.after_step()  # CONSERVATIVE freezes seeds in their stage (alpha included)
        return True

    def _bad_step(self, p: Parts, bad: Signal, stats: EpochStats, cull: str | None = None) -> bool:
        """The step is not applied; the emergency level decides what happens next."""
        p.optimizer.optimizer.zero_grad(set_to_none=True)
        p.accumulation.reset()  # a window's gradients so far go with it
        stats.skipped += 1
        self.emit("tolaria", "step.skipped", "WARNING", cause=bad.cause, global_step=p.state.global_step)
        p.safety.handle(bad, cull=cull)
        return False
