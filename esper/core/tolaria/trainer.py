"""Tolaria's trainer: the run, the epoch loop and the step, driven by the trainer lifecycle (L-3).

The parts come from ``builder``; what a checkpoint holds is ``components``, when and under which name one is
written is ``checkpointer``; what an emergency level does is ``safety``; the controller's share of an epoch is
``decisions``; drill faults act through the ``injector``'s hooks. ARCHITECTURE.md has the whole picture.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import esper
import esper.core.tolaria.operator as operator
import esper.core.tolaria.passes as passes
import esper.core.tolaria.records as records
from esper.core.checkpoint import LoadedCheckpoint
from esper.core.config import EsperConfig
from esper.core.data import Task, build_task, steps_per_epoch
from esper.core.errors import CheckpointError, DiskFault, ExitCode
from esper.core.io.bounded import clip
from esper.core.kasmina import SeedForwardError, SeedSlot
from esper.core.records import requests
from esper.core.records.rundir import RunDir, disk_fault, is_disk_error
from esper.core.records.telemetry import Emitter, TelemetryDeliveryError, TelemetryError, TelemetryWriteError
from esper.core.tolaria.builder import ControllerFactory, Parts, build_parts, controller_factory
from esper.core.tolaria.compute import layout_key
from esper.core.tolaria.early_stop import early_stop
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.injector import DataLoaderError, FaultEntry
from esper.core.tolaria.safety import Halt, Restart
from esper.core.tolaria.signals import StopRequest
from esper.core.tolaria.train_state import EpochStats
from esper.statemachines import TRAINER, StrictMachine, TransitionRecord


class Trainer:
    """Drives epochs through the trainer machine over the parts ``build`` makes from one config."""

    def __init__(self, cfg: EsperConfig, run_dir: RunDir, *, reporter: records.Reporter | None = None,
                 emitter: Emitter | None = None, controller_factory: ControllerFactory | None = controller_factory,
                 faults: Sequence[FaultEntry] = (), stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_dir.run_id
        self.reporter = reporter or records.Silent()
        self.emitter = emitter or Emitter(run_dir.events, self.run_id, cfg.telemetry)
        self.emit = self.emitter.emit
        self.machine = StrictMachine(TRAINER, self.run_id, observer=self._on_trainer_change)
        self.stop = stop or StopRequest()
        self.failure: dict[str, Any] | None = None
        self._controller_factory = controller_factory
        self._faults = tuple(faults)  # injected besides the config's (a drill's forced level)
        self.parts: Parts | None = None
        self.task: Task | None = None
        self._resuming = False
        self.started: str | None = None  # UTC of this session's run.started/run.resuming record

    def build(self) -> Parts:
        if self.task is None:
            self.task = build_task(self.cfg)
        self.parts = build_parts(self.cfg, self.run_dir, self.machine, self.emit, task=self.task,
                                 controller=self._controller_factory, faults=self._faults)
        return self.parts

    def close(self) -> None:
        """Stop the controller worker and the blueprint prefetcher: nothing of the run outlives it."""
        if self.parts is not None:
            self.parts.close()

    # -------------------------------------------------------------------- run
    def open(self, resume: LoadedCheckpoint | None = None) -> Parts:
        """Build every part and, on a resume, restore the checkpoint's state into them: in memory only, so a
        checkpoint whose state does not fit (however it passed verification) is a CheckpointError before anything
        in the run directory changes (with a held emitter, not even an event). Closes what it built on failure."""
        self._resuming = resume is not None
        try:
            self.task = build_task(self.cfg)
            self._announce()
            p = self.build()
            if resume is not None:
                self._restore(p, resume)
        except BaseException:
            self.close()
            raise
        return p

    def run(self, resume: LoadedCheckpoint | None = None) -> dict[str, Any]:
        """Train to completion (or stop/halt/failure); always returns the summary and writes summary.json. Opens
        the trainer first unless :meth:`open` already did (a failure to open is then recorded like any other)."""
        try:
            try:
                p = self.parts if self.parts is not None else self.open(resume)
                if resume is not None:
                    self._resumed(p, resume)
                self.machine.fire("ready", reason="built" if resume is None else f"restored {resume.path}")
                self._serve_requests(p, stale=True)  # written for an earlier process: never applied
                p.rollback.take()
                with p.profiler:
                    self._loop(p)
                p.safety.handle(p.checkpointer.flush())  # the last background write ends before the summary
                self._finish_reports(p)
            except Halt as h:
                assert self.parts is not None  # only safety raises Halt
                self.parts.safety.halt(h.reason)
        except KeyboardInterrupt:
            # second SIGINT: abort now; checkpoints are atomic, so `latest` still verifies
            self._fail(KeyboardInterrupt("aborted by a second interrupt"), exit_code=ExitCode.SIGINT)
        except (TelemetryDeliveryError, TelemetryWriteError) as exc:
            self._telemetry_lost(exc)
        except OSError as exc:
            if not is_disk_error(exc):
                self._fail(exc)
            else:
                self._disk_fault(exc)
        except DiskFault as exc:
            self._disk_fault(exc)
        except Exception as exc:  # noqa: BLE001 - recorded as FAILED (never swallowed): exit code follows
            self._fail(exc)
        finally:
            self.close()
        return self.finish()

    def _announce(self) -> None:
        """The session's first record, once: what it plans (C1: task, epochs, steps per epoch) once the task is
        built; a run that failed to build its task still starts its events with it, without the task."""
        if self.started is not None:
            return
        task: dict[str, Any] = {}
        if self.task is not None:
            d = self.cfg.data
            task = {"task": self.task.describe(), "steps_per_epoch": steps_per_epoch(
                len(self.task.train), d.batch_size, d.drop_last)}  # type: ignore[arg-type]
        record = self.emit("tolaria", "run.resuming" if self._resuming else "run.started", "INFO",
                           config_hash=self.cfg.config_hash(), esper=esper.__version__, torch=torch.__version__,
                           epochs=self.cfg.trainer.epochs, **task)
        self.started = record["utc"] if record is not None else records.utc_now()

    def _restore(self, p: Parts, resume: LoadedCheckpoint) -> None:
        try:
            p.components.load_state_dict(p.components.from_checkpoint(resume.tensors, resume.payload))
        except CheckpointError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a sealed but forged state makes a part raise is the
            # checkpoint's problem (exit 4), found before anything is written, never a crash
            raise CheckpointError(f"checkpoint {resume.path}: its state cannot be restored into this run: "
                                  f"{type(exc).__name__}: {clip(str(exc), 300)}") from exc
        p.checkpointer.last = resume.path

    def _serve_requests(self, p: Parts, *, stale: bool = False) -> None:
        """Operator requests waiting in the run directory (``esper emergency clear``), at a step boundary."""
        if requests.pending(self.run_dir.path):
            operator.serve(self.run_dir.path, self.run_id, p.emergency, self.emit, stale=stale)
            self.emitter.flush()  # the requester is waiting for the answer

    def _finish_reports(self, p: Parts) -> None:
        """A completed run files the field reports its last commands' windows never reached (T-12), marked as
        short windows: the run ended before the window did."""
        if p.decisions is None:
            return
        if self.machine.state == "COMPLETED":
            p.decisions.file_short_reports(f"the run completed after {self.cfg.trainer.epochs} epochs")
        growth = p.decisions.growth()
        if growth["warning"]:
            self.emit("tamiyo", "growth.failed", "WARNING", **growth)

    def _resumed(self, p: Parts, resume: LoadedCheckpoint) -> None:
        dropped = self.run_dir.rewrite_metrics(p.state.history)  # rows after the checkpoint are redone
        if dropped:
            self.emit("tolaria", "metrics.rewound", "WARNING", dropped_rows=dropped,
                      reason="rows after the resumed checkpoint are recomputed")
        pos = p.state.position
        self.emit("tolaria", "resumed", "CRITICAL", checkpoint=str(resume.path), epoch=pos.epochs_done,
                  step_in_epoch=pos.step_in_epoch, global_step=pos.global_step,
                  previous_level=resume.manifest.emergency.level if resume.manifest.emergency else None)

    def _loop(self, p: Parts) -> None:
        epoch, skip = p.state.epochs_done + 1, p.state.step_in_epoch
        t = self.cfg.trainer
        reason = f"{t.epochs} epochs done"
        while epoch <= t.epochs:
            try:
                if not self._run_epoch(p, epoch, skip):
                    return  # operator stop
            except Restart as r:
                self.reporter.notice(r.reason)  # else the next epoch line silently repeats the epoch
                epoch, skip = r.position.epochs_done + 1, r.position.step_in_epoch
                continue
            stop = early_stop(p.state.history, p.task, t) if epoch < t.epochs else None
            if stop is not None:
                self.emit("tolaria", "early_stop", "WARNING", reason=stop, epochs_done=epoch, planned=t.epochs)
                self.reporter.notice(stop)
                reason = stop
                break
            epoch, skip = epoch + 1, 0
        self.machine.fire("complete", reason=reason)

    def _run_epoch(self, p: Parts, epoch: int, skip: int) -> bool:
        """One epoch; returns False when an operator stop ended the run inside it."""
        self.emitter.set_context(epoch=epoch, step=p.state.global_step)
        if self.machine.state not in ("TRAINING", "PAUSED"):
            trigger = "pause" if p.safety.paused else "train"
            self.machine.fire(trigger, reason=f"epoch {epoch}" + (f" from step {skip}" if skip else ""))
        stats = self._train_epoch(p, epoch, skip)
        if stats is None:
            return False
        self.machine.fire("validate", reason=f"end of epoch {epoch}")
        p.parallel.buffers(p.host)  # every rank validates, fingerprints and checkpoints rank 0's statistics
        val = self.evaluate(frozenset())
        bad = {k: v for k, v in val.items() if not math.isfinite(v)}
        if bad:
            p.safety.handle(Signal("ELEVATED", "non_finite_validation", f"validation metrics {bad}", {}))
        decisions = {"accepted": 0, "rejected": 0}
        if p.safety.paused:
            self.emit("tamiyo", "controller.suspended", "WARNING", emergency_level=p.emergency.level,
                      reason="CONSERVATIVE: no lifecycle mutations while paused")
        else:
            changed = p.kasmina.end_epoch(self.evaluate)
            if changed:
                p.optimizer.rebuild(f"automatic lifecycle changes in {changed}")
            if p.decisions is not None:
                decisions = p.decisions.decide(epoch, stats, val)
        p.emergency.end_epoch()
        p.parallel.check_epoch(epoch, p.kasmina.records(), p.optimizer.named_params(),  # every rank alike, or HALT
                               list(p.host.named_buffers()))
        row = records.metrics_row(epoch, p.state.global_step, stats, p.task, val, p.kasmina,
                                  p.optimizer.optimizer, p.emergency.level, decisions, p.compute.row())
        for slot in p.kasmina.slots.values():
            slot.clear_blend_telemetry()  # the row holds this epoch's; the next starts from zero
        p.state.end_epoch(row)
        self.run_dir.append_metrics(row)
        slots = records.slot_views(p.kasmina.records(), row.get("blend"))
        self.emit("tolaria", "epoch.completed", "INFO", **{k: v for k, v in row.items() if k != "epoch"},
                  slots=slots)
        self.emit("telemetry", "telemetry.window", "INFO", **self.emitter.reset_window())  # this epoch's (O-4)
        if p.loader is not None:
            p.loader.report_window()  # the blueprint cache's counters of this epoch (O-4)
        if epoch % self.cfg.checkpoint.every_epochs == 0 or epoch == self.cfg.trainer.epochs:
            self.machine.fire("checkpoint", reason=f"every {self.cfg.checkpoint.every_epochs} epoch(s)")
            p.safety.handle(p.checkpointer.poll())  # a background write that has ended: settled first
            p.safety.handle(p.checkpointer.check_latest())
            p.safety.handle(p.checkpointer.save("periodic"))
        if p.emergency.last_epoch_healthy:
            p.rollback.take()  # a healthy boundary: the new last-known-good
        self.emitter.flush()  # readers following the run (`esper watch`) see every epoch's events as it ends
        self.reporter.epoch_end(row, slots)
        return True

    # ----------------------------------------------------------------- epochs
    def _batches(self, p: Parts, epoch: int, start: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        return passes.epoch_batches(p, self.cfg.data, self.cfg.run.seed, epoch, start, self.emitter, self.emit)

    def _train_epoch(self, p: Parts, epoch: int, skip: int) -> EpochStats | None:
        p.host.train()
        stats = p.state.start_epoch(epoch, skip)
        self.reporter.epoch_start(epoch, p.steps_per_epoch)
        training_slots = [s for s in p.kasmina.slots.values() if s.stage == "TRAINING"]
        data = self._batches(p, epoch, skip)
        try:
            while True:
                if self.stop.requested:
                    self._graceful_stop(p)
                    return None
                self._serve_requests(p)
                try:
                    index, x, y = next(data)
                except StopIteration:
                    break
                except DataLoaderError as exc:
                    # ELEVATED always ends in a Restart (rollback) or a Halt, so nothing after this runs
                    p.safety.handle(Signal("ELEVATED", "dataloader_error", str(exc), {}))
                    raise
                self.train_step(x, y, stats, training_slots, index)
                p.profiler.step()
                p.state.step_in_epoch = index + 1
        finally:
            data.close()  # its loader (and any worker processes) end here, also on a rollback's Restart
        if self.stop.requested and epoch < self.cfg.trainer.epochs:
            self._graceful_stop(p)
            return None
        return stats

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
        p.safety.handle(p.faults.before_step(p.kasmina))
        x, y = x.to(p.device, non_blocking=p.pin_memory), y.to(p.device, non_blocking=p.pin_memory)
        task = p.task
        opt = p.optimizer.optimizer
        if not acc.pending:
            opt.zero_grad(set_to_none=True)
        p.parallel.buffers(p.host)  # rank 0's BatchNorm statistics on every rank, as DDP's broadcast_buffers
        amp = p.precision
        # the window's mean gradient: each batch's loss scaled by its share (a window of one: the loss as it is)
        scale = amp.scale if size == 1 else (lambda t: amp.scale(t / size))
        layout = layout_key(x, True, p.kasmina.slots.values())  # what this step's FLOPs depend on
        try:
            with amp.autocast(), p.compute.phase("forward", layout):
                out = p.kasmina.forward(x)
                loss = p.faults.corrupt_loss(task.loss(out, y))
            value, n = p.parallel.loss(loss, len(y), self.stop)  # the global batch's, under torchrun
            bad = p.emergency.check_loss(value)  # a non-finite loss is an emergency in every precision
            if bad is not None:
                return self._bad_step(p, bad, stats)
            with p.compute.phase("backward", layout):
                scale(loss).backward()
            with amp.autocast(), p.compute.phase("seeds", layout):
                measured = p.kasmina.seed_passes(training_slots, x, y, task.loss, scale=scale, teacher=out.detach())
        except SeedForwardError as exc:
            return self._bad_step(p, Signal("ELEVATED", "seed_forward_error", str(exc), {"slot": exc.slot}), stats,
                                  cull=exc.slot)
        p.faults.after_backward(p.host.parameters())
        acc.add(measured)
        if last and not self._optimizer_step(p, stats, training_slots):
            return False
        p.emergency.accept_loss(value)
        with torch.no_grad():
            metrics = p.parallel.metrics({name: float(fn(out, y)) for name, fn in task.metrics.items()}, len(y))
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

    def _optimizer_step(self, p: Parts, stats: EpochStats, training_slots: list[SeedSlot]) -> bool:
        """The end of a window: the gradients reduced, checked, clipped and applied; returns whether they were."""
        opt = p.optimizer.optimizer
        amp = p.precision
        # reduced while still scaled (every rank sees one overflow); the seeds' losses and latencies ride along, so
        # G2 judges the global batch's figures on every rank alike
        measured = p.parallel.grads(p.optimizer.named_params(), p.accumulation.close())
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

    def _graceful_stop(self, p: Parts) -> None:
        """SIGINT/SIGTERM: the current step is finished; write a checkpoint, then STOPPED."""
        name = self.stop.name
        # the operator's signal, as the CLI process received it: one of the CLI's own events (source cli)
        self.emit("cli", "stop.requested", "CRITICAL", signal=name, epoch=p.state.epoch,
                  step_in_epoch=p.state.step_in_epoch)
        self.machine.fire("checkpoint", reason=f"{name}: graceful stop")
        p.safety.handle(p.checkpointer.save("graceful_stop"))
        self.machine.fire("stop", reason=f"{name} after a graceful checkpoint")

    def evaluate(self, bypass: frozenset[str]) -> dict[str, float]:
        """``val_loss`` and ``val_<metric>``, optionally with some slots bypassed (the counterfactual)."""
        return passes.validate(self._parts(), self.cfg.data, bypass)

    def _parts(self) -> Parts:
        if self.parts is None:
            raise RuntimeError("the trainer is not built: call build() (run() does)")
        return self.parts

    # ---------------------------------------------------------------- records
    def _fail(self, exc: BaseException, exit_code: int | None = None) -> None:
        self.failure = records.failure_record(exc, self.parts, exit_code)
        self._announce()  # a run that failed to build its task still starts its events with run.started
        self.emit("tolaria", "run.failed", "CRITICAL", **self.failure)
        if self.machine.may("fail"):
            self.machine.fire("fail", reason=f"{type(exc).__name__}: {exc}")

    def _telemetry_lost(self, exc: TelemetryDeliveryError | TelemetryWriteError) -> None:
        """Events could not be made durable (E-4): halt; the record goes to summary.json instead."""
        self.machine.observer = None  # its events cannot be delivered either
        self.failure = records.failure_record(exc, self.parts, ExitCode.HALTED)
        if self.machine.may("halt"):
            self.machine.fire("halt", reason=f"telemetry delivery failed: {exc}")

    def _disk_fault(self, exc: BaseException) -> None:
        """The disk refused a write the run needs (S-6): HALT at once, with no emergency checkpoint (the disk will
        not take it); the last verified checkpoint is left as it is."""
        fault = exc if isinstance(exc, DiskFault) else disk_fault("a run file could not be written", exc)  # type: ignore[arg-type]
        self.failure = records.failure_record(fault, self.parts, ExitCode.HALTED)
        reason = f"disk fault: {fault}"
        try:
            if self.parts is not None and self.parts.emergency.level != "HALT":
                self.parts.emergency.escalate("HALT", reason, cause="disk_fault")
            if self.machine.may("halt"):
                self.machine.fire("halt", reason=reason)
        except (TelemetryDeliveryError, TelemetryWriteError):
            self.machine.observer = None  # the events file is on the failing disk too
            if self.machine.may("halt"):
                self.machine.fire("halt", reason=reason)

    def _on_trainer_change(self, record: TransitionRecord) -> None:
        level = "CRITICAL" if record.dest in ("FAILED", "HALTED", "STOPPED") else "INFO"
        self.emit("tolaria", "trainer.transition", level, transition=record.to_dict())

    def exit_code(self) -> int:
        if self.failure is not None:
            return int(self.failure["exit_code"])
        if self.machine.state == "STOPPED":
            return int(ExitCode.SIGINT if self.stop.signal == signal.SIGINT else ExitCode.SIGTERM)
        return int({"COMPLETED": ExitCode.OK, "HALTED": ExitCode.HALTED}.get(self.machine.state, ExitCode.INTERNAL))

    def finish(self) -> dict[str, Any]:
        """Write summary.json and close the event log. A disk that refuses them leaves the summary in memory (the
        CLI prints it) with ``record_errors`` saying what was lost, never a traceback."""
        summary = records.summary(self.run_id, self.machine.state, self.exit_code(), self.parts, self.failure,
                                  str(self.run_dir.path), self.task, started=self.started)
        lost: list[str] = []
        try:
            self.run_dir.write_summary(summary)
        except OSError as exc:
            lost.append(f"summary.json not written: {exc.strerror or exc}")
        self.stop.settled = True  # decided (on disk, or printed by the CLI when the disk refused it)
        try:
            if self.machine.observer is not None:
                self.emit("tolaria", "run.finished", "INFO" if summary["exit_code"] == 0 else "CRITICAL",
                          status=summary["status"], exit_code=summary["exit_code"])
            self.emitter.close()
        except TelemetryError as exc:
            lost.append(f"events.jsonl incomplete: {clip(str(exc), 300)}")
        if lost:
            summary["record_errors"] = lost
        return summary

