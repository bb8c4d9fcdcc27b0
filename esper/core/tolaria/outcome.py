"""The run's record: its first event, a resume's restore and notice, a failure, a disk fault or lost telemetry, the
exit code and ``summary.json`` (a part of :class:`~esper.core.tolaria.trainer.Trainer`, kept apart from the
loop)."""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

import torch

import esper
from esper.core.checkpoint import LoadedCheckpoint
from esper.core.config import EsperConfig
from esper.core.data import Task, steps_per_epoch
from esper.core.errors import CheckpointError, DiskFault, ExitCode
from esper.core.io.bounded import clip
from esper.core.records.rundir import RunDir, disk_fault
from esper.core.records.telemetry import Emitter, TelemetryDeliveryError, TelemetryError, TelemetryWriteError
from esper.core.tolaria import records
from esper.core.tolaria.builder import Parts
from esper.core.tolaria.signals import StopRequest
from esper.statemachines import StrictMachine, TransitionRecord


class RunRecord:
    """What the run says about itself; what it reads of the trainer is declared here."""

    cfg: EsperConfig
    run_dir: RunDir
    run_id: str
    emitter: Emitter
    emit: Callable[..., Any]
    machine: StrictMachine
    stop: StopRequest
    failure: dict[str, Any] | None
    parts: Parts | None
    task: Task | None
    started: str | None
    _resuming: bool

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

    def _resumed(self, p: Parts, resume: LoadedCheckpoint) -> None:
        dropped = self.run_dir.rewrite_metrics(p.state.history)  # rows after the checkpoint are redone
        if dropped:
            self.emit("tolaria", "metrics.rewound", "WARNING", dropped_rows=dropped,
                      reason="rows after the resumed checkpoint are recomputed")
        pos = p.state.position
        self.emit("tolaria", "resumed", "CRITICAL", checkpoint=str(resume.path), epoch=pos.epochs_done,
                  step_in_epoch=pos.step_in_epoch, global_step=pos.global_step,
                  previous_level=resume.manifest.emergency.level if resume.manifest.emergency else None)

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
