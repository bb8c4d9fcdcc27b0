"""Tolaria's trainer: the run and the epoch loop, driven by the trainer lifecycle (L-3).

One batch and its optimizer step are ``step``; the run's record (its events, failure, exit code, summary) is
``outcome``. The parts come from ``builder``; what a checkpoint holds is ``components``, when and under which
name one is written is ``checkpointer``; what an emergency level does is ``safety``; the controller's share of
an epoch is ``decisions``; drill faults act through the ``injector``'s hooks. ARCHITECTURE.md has the whole
picture.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

import esper.core.tolaria.operator as operator
import esper.core.tolaria.passes as passes
import esper.core.tolaria.records as records
from esper.core.checkpoint import LoadedCheckpoint
from esper.core.config import EsperConfig
from esper.core.data import Task, build_task
from esper.core.errors import DiskFault, ExitCode
from esper.core.records import requests
from esper.core.records.rundir import RunDir, is_disk_error
from esper.core.records.telemetry import Emitter, TelemetryDeliveryError, TelemetryWriteError
from esper.core.tolaria.builder import ControllerFactory, Parts, build_parts, controller_factory
from esper.core.tolaria.early_stop import early_stop
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.injector import DataLoaderError, FaultEntry
from esper.core.tolaria.outcome import RunRecord
from esper.core.tolaria.safety import Halt, Restart
from esper.core.tolaria.signals import StopRequest
from esper.core.tolaria.step import Steps
from esper.core.tolaria.train_state import EpochStats
from esper.statemachines import TRAINER, StrictMachine


class Trainer(RunRecord, Steps):
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
                with p.checkpointer.timed():  # the last background write ends before the summary
                    p.safety.handle(p.checkpointer.flush())
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

    def _serve_requests(self, p: Parts, *, stale: bool = False) -> None:
        """Operator requests waiting in the run directory (``esper emergency clear``), at a step boundary."""
        if requests.pending(self.run_dir.path):
            operator.serve(self.run_dir.path, self.run_id, p.emergency, self.emit, stale=stale)
            self.emitter.flush()  # the requester is waiting for the answer

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
            with p.checkpointer.timed():  # a checkpoint signal is a NOTICE or a HALT (its emergency write)
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
        if p.accumulation.left_open(None):  # a window never spans two epochs
            self.close_window(p, stats, training_slots)
        if self.stop.requested and epoch < self.cfg.trainer.epochs:
            self._graceful_stop(p)
            return None
        return stats

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

