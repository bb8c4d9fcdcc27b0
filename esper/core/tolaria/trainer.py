"""Tolaria: the training loop, driven by the trainer lifecycle (L-3).

The loop is here; what emergencies do is in ``safety``; snapshots and checkpoints are ``state`` and
``rollback``; calls into the controller go through the one ``mediator``.
"""

from __future__ import annotations

import math
import os
import platform
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import esper
from esper.core.checkpoint import (
    CheckpointPruneError,
    CheckpointWriteError,
    LoadedCheckpoint,
    latest_checkpoint,
    verify_checkpoint,
    write_checkpoint,
)
from esper.core.config import EsperConfig
from esper.core.data import Dataset, batches, build_dataset, steps_per_epoch
from esper.core.errors import EsperError, ExitCode
from esper.core.faults import FaultInjector
from esper.core.host import build_host, layer_widths
from esper.core.kasmina.kasmina import Kasmina
from esper.core.kasmina.slot import LIVE, Mode, SeedForwardError
from esper.core.kasmina_loader import BlueprintLoadError, BlueprintLoadManager, ParameterOwnership
from esper.core.mediator import ControllerCrashed, ControllerTimeout, Mediator, open_controller
from esper.core.optim import LRSchedule, OptimizerError, build_optimizer, rebuild_optimizer
from esper.core.rundir import RunDir
from esper.core.tamiyo import FieldReportLog, Tamiyo
from esper.core.tamiyo import worker as tamiyo_worker
from esper.core.telemetry import Emitter, TelemetryDeliveryError
from esper.core.tolaria.emergency import EmergencyManager, Signal
from esper.core.tolaria.profiler import ProfilerWindow
from esper.core.tolaria.rollback import RollbackManager
from esper.core.tolaria.safety import Halt, Restart, Safety
from esper.core.tolaria.state import Position, capture, checkpoint_name, restore
from esper.statemachines import TRAINER, GateRejected, IllegalTransition, StrictMachine, TransitionRecord


class Reporter(Protocol):
    """What the CLI shows while training; the trainer never prints."""

    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, loss: float) -> None: ...
    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None: ...


class _Silent:
    def epoch_start(self, epoch: int, steps: int) -> None:
        pass

    def step(self, loss: float) -> None:
        pass

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        pass


class DataLoaderError(EsperError):
    """The training data could not be read."""


@dataclass
class EpochStats:
    """Aggregation of one epoch's steps."""

    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    steps: int = 0
    skipped: int = 0
    step_ms: list[float] = field(default_factory=list)

    def add(self, loss: float, correct: int, n: int, ms: float) -> None:
        self.loss_sum += loss * n
        self.correct += correct
        self.seen += n
        self.steps += 1
        self.step_ms.append(ms)


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # computed on the output's device (Tolaria #22)
    return F.cross_entropy(logits, y.to(logits.device))


def controller_factory(cfg: EsperConfig, run_id: str) -> Tamiyo:
    """The run's controller, built once from the resolved config (Tamiyo #16)."""
    return Tamiyo(cfg.controller, cfg.seeds, run_id)


class Trainer:
    """Builds the run's parts from one config and drives epochs through the trainer machine."""

    def __init__(
        self,
        cfg: EsperConfig,
        run_dir: RunDir,
        *,
        reporter: Reporter | None = None,
        emitter: Emitter | None = None,
        controller_factory: Callable[[EsperConfig, str], Tamiyo] | None = controller_factory,
        forced_level: tuple[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.run_id = run_dir.run_id
        self.reporter = reporter or _Silent()
        self.emitter = emitter or Emitter(run_dir.events, self.run_id, cfg.telemetry)
        self.emit = self.emitter.emit
        self.machine = StrictMachine(TRAINER, self.run_id, observer=self._on_trainer_change)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.commands: Counter[str] = Counter()
        self.failure: dict[str, Any] | None = None
        self._controller_factory = controller_factory
        self.stats: EpochStats | None = None  # the epoch in progress
        self.step_in_epoch = 0
        self.stop_signal: int | None = None  # set by the signal handler; acted on after the current step
        self.last_checkpoint: Path | None = None
        self.checkpoint_failures = 0
        self.faults = FaultInjector([(f.name, f.at) for f in cfg.faults], self.emit, forced_level)
        self.safety = Safety(self)
        self.rollback_mgr = RollbackManager(self)
        self.mediator: Mediator | None = None
        self.loader: BlueprintLoadManager | None = None
        self.controller: Tamiyo | None = None
        self._named_cache: list[tuple[str, nn.Parameter]] | None = None
        self._quarantine: Path | None = None  # a corrupt checkpoint to move aside after the next good write

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        cfg = self.cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.use_deterministic_algorithms(True)
        self.device = torch.device(cfg.run.device)
        self.data: Dataset = build_dataset(cfg)
        self.host: nn.Module = build_host(cfg, self.data.n_features, self.data.n_classes).to(self.device)
        seeds_cfg = cfg.seeds if cfg.seeds.enabled else cfg.seeds.model_copy(update={"slots": []})
        widths = layer_widths(self.host, [s.layer for s in seeds_cfg.slots], self.data.n_features)
        kcfg = cfg if cfg.seeds.enabled else cfg.model_copy(update={"seeds": seeds_cfg})
        self.kasmina = Kasmina(kcfg, self.host, widths, self.emit)
        if seeds_cfg.slots:
            registry = self.kasmina.registry
            self.loader = BlueprintLoadManager(
                lambda name, width: registry.build(name, width, cfg.run.seed), cache_bytes=cfg.seeds.cache_bytes,
                workers=cfg.seeds.prefetch_workers, timeout_ms=cfg.seeds.load_timeout_ms, compile=cfg.seeds.compile,
                emit=self.emit)
            loader = self.loader
            self.kasmina.build_module = loader.get
            # the controller may germinate any allowed blueprint in any slot: prefetch them all now
            for name in cfg.seeds.blueprints:
                for width in sorted(set(widths.values())):
                    loader.prefetch(name, width)
        self.ownership = ParameterOwnership()
        self.rebuild_optimizer_fresh()
        self.steps_per_epoch = steps_per_epoch(self.data, cfg.data.batch_size)
        self.schedule = LRSchedule(cfg.trainer, cfg.trainer.epochs * self.steps_per_epoch)
        self.emergency = EmergencyManager(cfg.emergency, self.emit)
        if self._controller_factory is not None and seeds_cfg.slots:
            self.controller = self._controller_factory(cfg, self.run_id)
            endpoint = open_controller(cfg.controller.isolation, tamiyo_worker.FACTORY,
                                       tamiyo_worker.factory_args(cfg.controller, cfg.seeds, self.run_id))
            self.mediator = Mediator(cfg.controller.timeout_ms, self.emit, controller=endpoint)
        self.report_log = FieldReportLog(self.run_dir.field_reports)
        self.profiler = ProfilerWindow(cfg.trainer.profiler, self.run_dir.path, self.emit)
        n = min(len(self.data.x_train), cfg.data.batch_size)
        self.probe = (self.data.x_train[:n].to(self.device), self.data.y_train[:n].to(self.device))

    def close(self) -> None:
        """Stop the controller worker and the blueprint prefetcher: nothing of the run outlives it."""
        if self.mediator is not None:
            self.mediator.close()
        if self.loader is not None:
            self.loader.shutdown(timeout_s=2.0)

    # -------------------------------------------------------------------- run
    def run(self, resume: LoadedCheckpoint | None = None) -> dict[str, Any]:
        """Train to completion (or stop/halt/failure); always returns the summary and writes summary.json."""
        self.emit("tolaria", "run.started" if resume is None else "run.resuming", "INFO",
                  config_hash=self.cfg.config_hash(), esper=esper.__version__, torch=torch.__version__)
        try:
            try:
                self.build()
                start = Position(0, 0, 0)
                if resume is not None:
                    start = self._resume(resume)
                self.machine.fire("ready", reason="built" if resume is None else f"restored {resume.path}")
                self.rollback_mgr.take(start)
                with self.profiler:
                    self._loop(start)
            except Halt as h:
                self.safety.halt(h.reason)
        except KeyboardInterrupt:
            # second SIGINT: abort now; checkpoints are atomic, so `latest` still verifies
            self._fail(KeyboardInterrupt("aborted by a second interrupt"), exit_code=ExitCode.SIGINT)
        except TelemetryDeliveryError as exc:
            self._telemetry_lost(exc)
        except Exception as exc:  # noqa: BLE001 - recorded as FAILED (never swallowed): exit code follows
            self._fail(exc)
        finally:
            self.close()
        return self.finish()

    def _resume(self, resume: LoadedCheckpoint) -> Position:
        start = restore(self, resume.tensors, resume.payload)
        self.last_checkpoint = resume.path
        self._rewrite_metrics()
        self.emit("tolaria", "resumed", "CRITICAL", checkpoint=str(resume.path), epoch=start.epochs_done,
                  step_in_epoch=start.step_in_epoch, global_step=start.global_step,
                  previous_level=resume.payload["emergency"]["level"])
        return start

    def _loop(self, start: Position) -> None:
        epoch, skip = start.epochs_done + 1, start.step_in_epoch
        while epoch <= self.cfg.trainer.epochs:
            self.epoch = epoch
            try:
                if not self._run_epoch(epoch, skip):
                    return  # operator stop
            except Restart as r:
                epoch, skip = r.position.epochs_done + 1, r.position.step_in_epoch
                continue
            epoch, skip = epoch + 1, 0
        self.machine.fire("complete", reason=f"{self.cfg.trainer.epochs} epochs done")

    def _run_epoch(self, epoch: int, skip: int) -> bool:
        """One epoch; returns False when an operator stop ended the run inside it."""
        self.emitter.set_context(epoch=epoch, step=self.global_step)
        if self.machine.state not in ("TRAINING", "PAUSED"):
            trigger = "pause" if self.safety.paused else "train"
            self.machine.fire(trigger, reason=f"epoch {epoch}" + (f" from step {skip}" if skip else ""))
        stats = self._train_epoch(epoch, skip)
        if stats is None:
            return False
        self.machine.fire("validate", reason=f"end of epoch {epoch}")
        val_loss, val_acc = self.evaluate(frozenset())
        if not math.isfinite(val_loss):
            self.safety.handle(Signal("ELEVATED", "non_finite_validation", f"validation loss is {val_loss}", {}))
        decisions = {"accepted": 0, "rejected": 0}
        if self.safety.paused:
            self.emit("tamiyo", "controller.suspended", "WARNING", emergency_level=self.emergency.level,
                      reason="CONSERVATIVE: no lifecycle mutations while paused")
        else:
            changed = self.kasmina.end_epoch(self.evaluate)
            if changed:
                self.rebuild_optimizer(f"automatic lifecycle changes in {changed}")
            decisions = self._decide(epoch, stats, val_loss, val_acc)
        self.emergency.end_epoch()
        row = self._metrics_row(epoch, stats, val_loss, val_acc, decisions)
        self.history.append(row)
        self.run_dir.append_metrics(row)
        self.emit("tolaria", "epoch.completed", "INFO", **{k: v for k, v in row.items() if k != "epoch"})
        self.stats = None
        pos = Position(epoch, 0, self.global_step)
        if epoch % self.cfg.checkpoint.every_epochs == 0 or epoch == self.cfg.trainer.epochs:
            self.machine.fire("checkpoint", reason=f"every {self.cfg.checkpoint.every_epochs} epoch(s)")
            self._check_latest()
            self.write_checkpoint(pos, "periodic")
        if self.emergency.last_epoch_healthy:
            self.rollback_mgr.take(pos)  # a healthy boundary: the new last-known-good
        self.reporter.epoch_end(row, self.kasmina.records())
        return True

    # ----------------------------------------------------------------- epochs
    def _batches(self, epoch: int, skip: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, set[str]]]:
        """The epoch's batches from ``skip`` on, with the drill faults due at each step."""
        for index, (x, y) in enumerate(batches(self.data, self.cfg.data.batch_size, self.cfg.run.seed, epoch)):
            if index < skip:
                continue
            self.step_in_epoch = index
            self.emitter.set_context(epoch=epoch, step=self.global_step)
            inject = self.faults.at_step(epoch, index, self.global_step)
            if "dataloader_error" in inject:
                raise DataLoaderError(f"injected fault: reading batch {index} of epoch {epoch} failed")
            yield index, x, y, inject

    def _train_epoch(self, epoch: int, skip: int) -> EpochStats | None:
        self.host.train()
        if skip == 0 or self.stats is None:
            self.stats = EpochStats()
        stats = self.stats
        self.reporter.epoch_start(epoch, self.steps_per_epoch)
        training_slots = [s for s in self.kasmina.slots.values() if s.stage == "TRAINING"]
        data = self._batches(epoch, skip)
        next_index = skip
        while True:
            if self.stop_signal is not None:
                self._graceful_stop(epoch, next_index)
                return None
            try:
                index, x, y, inject = next(data)
            except StopIteration:
                break
            except DataLoaderError as exc:
                # ELEVATED always ends in a Restart (rollback) or a Halt, so nothing after this runs
                self.safety.handle(Signal("ELEVATED", "dataloader_error", str(exc), {}))
                raise
            self.train_step(x, y, stats, training_slots, inject)
            self.profiler.step()
            next_index = index + 1
        if self.stop_signal is not None and epoch < self.cfg.trainer.epochs:
            self._graceful_stop(epoch, self.steps_per_epoch)
            return None
        return stats

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: EpochStats,
                   training_slots: list[Any] | None = None, inject: set[str] | frozenset[str] = frozenset()) -> bool:
        """One optimizer step with every safety check; returns whether the step was applied.

        ``inject`` names drill faults acting in this step; each acts through the real code path (a real NaN in
        the loss, a real exception in a seed's forward, a real signal...).
        """
        t0 = time.perf_counter()
        if training_slots is None:
            training_slots = [s for s in self.kasmina.slots.values() if s.stage == "TRAINING"]
        if inject:
            self._inject_step_faults(inject)
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            logits = self.kasmina.forward(x)
            loss = _loss(logits, y)
            if "nan_loss" in inject:
                loss = loss * float("nan")
            if "loss_spike" in inject:
                loss = loss * (self.cfg.emergency.loss_explosion_factor * 100.0)
            value = float(loss.detach())
            signal_ = self.emergency.check_loss(value)
            if signal_ is not None:
                return self._bad_step(signal_, stats)
            loss.backward()
            self.kasmina.seed_passes(training_slots, x, y, _loss)
        except SeedForwardError as exc:
            return self._bad_step(Signal("ELEVATED", "seed_forward_error", str(exc), {"slot": exc.slot}), stats,
                                  cull=exc.slot)
        if "inf_grad" in inject:
            first = next(p for p in self.host.parameters() if p.grad is not None)
            first.grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]
        signal_ = self.emergency.check_grads(self._named_params())
        if signal_ is not None:
            return self._bad_step(signal_, stats)
        if self.cfg.trainer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.trainer.grad_clip)
        self.schedule.apply(self.optimizer, self.global_step)
        self.optimizer.step()
        self.global_step += 1
        if not self.safety.paused:
            self.kasmina.after_step()  # CONSERVATIVE freezes seeds in their stage (alpha included)
        self.emergency.accept_loss(value)
        ms = (time.perf_counter() - t0) * 1000.0
        correct = int((logits.detach().argmax(dim=1) == y).sum())
        stats.add(value, correct, len(y), ms)
        self.reporter.step(value)
        if ms > self.cfg.emergency.slow_step_ms:
            self.safety.handle(Signal("NOTICE", "slow_step", f"step took {ms:.0f} ms > "
                                      f"{self.cfg.emergency.slow_step_ms:.0f} ms", {"step_ms": ms}))
        return True

    def _inject_step_faults(self, inject: set[str] | frozenset[str]) -> None:
        if "sigterm" in inject:
            os.kill(os.getpid(), signal.SIGTERM)
        if "slow_step" in inject:
            time.sleep(self.cfg.emergency.slow_step_ms * 1.5 / 1000.0)
        if "seed_forward_error" in inject:
            live = [s for s in self.kasmina.slots.values() if s.module is not None and s.stage in LIVE]
            if live:
                live[0].fail_forward = RuntimeError("injected fault: seed_forward_error")
            else:
                self.emit("tolaria", "fault.not_applicable", "WARNING", fault="seed_forward_error",
                          reason="no live seed to fail")
        if "force_level" in inject and self.faults.forced_level is not None:
            level = self.faults.forced_level
            self.safety.handle(Signal(level, "forced", f"drill forced level {level}", {}))

    def _bad_step(self, signal_: Signal, stats: EpochStats, cull: str | None = None) -> bool:
        """The step is not applied; the emergency level decides what happens next."""
        self.optimizer.zero_grad(set_to_none=True)
        stats.skipped += 1
        self.emit("tolaria", "step.skipped", "WARNING", cause=signal_.cause, global_step=self.global_step)
        self.safety.handle(signal_, cull=cull)
        return False

    def _graceful_stop(self, epoch: int, index: int) -> None:
        """SIGINT/SIGTERM: the current step is finished; write a checkpoint, then STOPPED."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
        self.emit("tolaria", "stop.requested", "CRITICAL", signal=name, epoch=epoch, step_in_epoch=index)
        self.machine.fire("checkpoint", reason=f"{name}: graceful stop")
        pos = Position(epoch - 1, index, self.global_step)
        current = latest_checkpoint(self.run_dir.checkpoints)
        if current is not None and current.name == checkpoint_name(pos, "graceful_stop"):
            # `latest` already holds exactly this state (the last periodic checkpoint, or the one resumed from)
            self.last_checkpoint = current
            self.emit("tolaria", "checkpoint.reused", "INFO", path=str(current), reason="graceful_stop")
        else:
            self.write_checkpoint(pos, "graceful_stop")
        self.machine.fire("stop", reason=f"{name} after a graceful checkpoint")

    @torch.no_grad()
    def evaluate(self, bypass: frozenset[str]) -> tuple[float, float]:
        """Validation loss/accuracy, optionally with some slots bypassed (counterfactual)."""
        self.host.eval()
        x, y = self.data.x_val.to(self.device), self.data.y_val.to(self.device)
        with self.kasmina.modes(Mode.BYPASS, bypass):
            logits = self.kasmina.forward(x)
        self.host.train()
        return float(_loss(logits, y)), float((logits.argmax(dim=1) == y).float().mean())

    # ------------------------------------------------------------ checkpoints
    def write_checkpoint(self, pos: Position, reason: str) -> Path | None:
        """Write a verified checkpoint; a failure is a CRITICAL event (and HALT after too many in a row)."""
        tensors, payload = capture(self, pos, reason)
        delay = self.cfg.checkpoint.commit_delay_ms / 1000.0
        fail = self.faults.take("checkpoint_write_error")

        def before_commit(_tmp: Path) -> None:
            if delay:
                time.sleep(delay)
            if fail:
                raise OSError(28, "No space left on device (injected fault: checkpoint_write_error)")

        name = checkpoint_name(pos, reason)
        current = latest_checkpoint(self.run_dir.checkpoints)
        if current is not None and current.name.startswith(name) and reason != "graceful_stop":
            # this position is trained again after a rollback: `latest` is never overwritten in place
            name = f"{name}-redo-{len(self.rollbacks):03d}"
        try:
            path = write_checkpoint(self.run_dir.checkpoints, name, tensors, payload,
                                    keep_last=self.cfg.checkpoint.keep_last, before_commit=before_commit)
        except CheckpointPruneError as exc:
            # the new checkpoint is committed and verified; only removing old ones failed: disk use, not safety
            path = exc.checkpoint
            self.emit("tolaria", "checkpoint.prune_failed", "WARNING", path=str(path), error=str(exc))
        except CheckpointWriteError as exc:
            self.checkpoint_failures += 1
            self.emit("tolaria", "checkpoint.failed", "CRITICAL", reason=reason, error=str(exc),
                      consecutive_failures=self.checkpoint_failures, kept=str(self.last_checkpoint))
            limit = self.cfg.emergency.max_checkpoint_failures
            if self.checkpoint_failures >= limit and not self.safety.halting:
                self.safety.handle(Signal("HALT", "checkpoint_failures",
                                          f"{self.checkpoint_failures} checkpoint writes failed in a row", {}))
            self.safety.handle(Signal("NOTICE", "checkpoint_write_error", str(exc), {}))
            return None
        self.checkpoint_failures = 0
        self.last_checkpoint = path
        if self._quarantine is not None and self._quarantine.exists():
            # kept as evidence for triage, out of keep_last's reach, once a verified successor exists
            target = self.run_dir.checkpoints / "quarantine" / self._quarantine.name
            target.parent.mkdir(exist_ok=True)
            os.rename(self._quarantine, target)
            self.emit("tolaria", "checkpoint.quarantined", "WARNING", path=str(target))
            self._quarantine = None
        self.emit("tolaria", "checkpoint.written", "INFO", path=str(path), reason=reason, epoch=pos.epochs_done,
                  step_in_epoch=pos.step_in_epoch, global_step=pos.global_step)
        if self.faults.take("checkpoint_corrupt"):
            _flip_byte(path / "model.safetensors")
            self.emit("tolaria", "fault.acted", "WARNING", fault="checkpoint_corrupt", path=str(path))
        return path

    def _check_latest(self) -> None:
        """Re-verify the newest checkpoint before relying on it: bit rot is found while it can be rewritten."""
        if self.last_checkpoint is None or not self.last_checkpoint.exists():
            return
        report = verify_checkpoint(self.last_checkpoint)
        if not report.ok:
            self.emit("tolaria", "checkpoint.corrupt_detected", "CRITICAL", path=str(self.last_checkpoint),
                      problems=report.problems)
            self._quarantine = self.last_checkpoint
            self.safety.handle(Signal("NOTICE", "checkpoint_corrupt", "; ".join(report.problems),
                                      {"path": str(self.last_checkpoint)}))

    def _rewrite_metrics(self) -> None:
        """On resume, metrics.jsonl is the checkpoint's history; rows after it are redone, not duplicated."""
        dropped = self.run_dir.rewrite_metrics(self.history)
        if dropped:
            self.emit("tolaria", "metrics.rewound", "WARNING", dropped_rows=dropped,
                      reason="rows after the resumed checkpoint are recomputed")

    def partial_stats(self) -> dict[str, Any] | None:
        if self.stats is None:
            return None
        return dict(self.stats.__dict__)

    def restore_partial_stats(self, d: dict[str, Any] | None) -> None:
        self.stats = EpochStats(**d) if d is not None else None

    def rebuild_optimizer_fresh(self) -> None:
        self._check_ownership()
        self.optimizer = build_optimizer(self.cfg.trainer, self.kasmina.param_groups())

    def _check_ownership(self) -> None:
        """Every optimized parameter has exactly one owner: the host or one seed (a user blueprint that reuses
        host parameters is a conflict, never silently trained twice)."""
        self._named_cache = None  # parameters are about to change
        self.ownership.register_host(self.host)  # re-registering resets every earlier claim (Kasmina #19)
        for s in self.kasmina.slots.values():
            if s.module is not None:
                self.ownership.claim(f"seed:{s.name}", s.params())
        issues = self.ownership.validate(self._named_params())
        if issues:
            self.emit("kasmina", "ownership.invalid", "ERROR", issues=[vars(i) for i in issues[:20]])
            raise OptimizerError(f"parameter ownership: {len(issues)} problem(s), first: {issues[0]}")

    # ------------------------------------------------------------- controller
    def _decide(self, epoch: int, stats: EpochStats, val_loss: float, val_acc: float) -> dict[str, int]:
        out = {"accepted": 0, "rejected": 0}
        if self.controller is None or self.mediator is None:
            return out
        if stats.seen == 0:
            self.emit("tamiyo", "controller.skipped", "WARNING", reason="no healthy training step this epoch")
            return out
        obs = self._observation(epoch, stats, val_loss, val_acc)
        payload = self.controller.payload(obs)
        for fault, injection in (("controller_timeout", "hang"), ("controller_crash", "crash"),
                                 ("illegal_command", "illegal_command")):
            if self.faults.take(fault):
                payload["inject"] = injection
        try:
            decision = self.controller.adopt(self.mediator.decide("decide", payload))
        except (ControllerTimeout, ControllerCrashed) as exc:
            # a failure, not a pause command (T-7): the level machine pauses the trainer
            cause = "controller_timeout" if isinstance(exc, ControllerTimeout) else "controller_crash"
            self.safety.handle(Signal("CONSERVATIVE", cause, str(exc), {}))
            return out
        for rej in decision.rejected:
            self._command_event(rej.command, accepted=False, stage=rej.stage, reason=rej.reason,
                                limit=rej.limit, deferred=rej.deferred)
            out["rejected"] += 1
            if rej.stage == "validator":  # the controller asked for something the lifecycle forbids
                self.safety.handle(Signal("NOTICE", "illegal_command", rej.reason,
                                          {"command_id": rej.command.command_id}))
        for cmd in decision.accepted:
            out["accepted" if self._apply(cmd) else "rejected"] += 1
        if decision.accepted:
            obs = self._observation(epoch, stats, val_loss, val_acc)  # stages changed by applied commands
        for report in self.controller.observe_outcomes(obs):
            written = self.report_log.append(report)  # False: already on disk (a resumed run re-files it)
            self.emit("tamiyo", "field_report.filed", "INFO", written=written, **report.to_dict())
        return out

    def _observation(self, epoch: int, stats: EpochStats, val_loss: float, val_acc: float) -> dict[str, Any]:
        slots = []
        for s in self.kasmina.slots.values():
            losses = s.stats.epoch_losses
            slots.append({
                "name": s.name, "stage": s.stage, "blueprint": s.blueprint,
                "epochs_in_stage": s.stats.epochs_in_stage, "alpha": s.alpha,
                "seed_loss_improvement": ((losses[0] - losses[-1]) / max(abs(losses[0]), 1e-12)
                                          if len(losses) >= 2 else None),
                "counterfactual_gain": s.stats.counterfactual.get("gain"),
                "candidate_params": self.kasmina.candidate_params(s.name),
            })
        return {
            "run_id": self.run_id, "epoch": epoch,
            "train_loss": stats.loss_sum / stats.seen,
            "val_loss": val_loss, "val_accuracy": val_acc,
            "step_latency_ms": sum(stats.step_ms) / max(len(stats.step_ms), 1),
            "rollbacks_total": len(self.rollbacks),
            "total_params": self.kasmina.total_params(),
            "slots": slots,
        }

    def _apply(self, cmd: Any) -> bool:
        """Apply an accepted command through Kasmina; a gate, lifecycle or load refusal becomes an event."""
        assert self.controller is not None
        try:
            if cmd.kind == "germinate":
                self.kasmina.germinate(cmd.slot, cmd.blueprint, cmd.reason)
                self.rebuild_optimizer(f"germinated {cmd.slot}")
                result = self.kasmina.probe_g1(cmd.slot, *self.probe, _loss)
                if result.passed:
                    self.kasmina.start_training(cmd.slot, result, reason=result.reason)
                else:
                    self.kasmina.cull(cmd.slot, reason=f"G1 failed: {result.reason}")
                    self.rebuild_optimizer(f"culled {cmd.slot}")
            elif cmd.kind == "cull":
                self.kasmina.cull(cmd.slot, cmd.reason)
                self.rebuild_optimizer(f"culled {cmd.slot}")
            elif cmd.kind == "fossilize":
                self.kasmina.fossilize(cmd.slot, cmd.reason)
                self.rebuild_optimizer(f"fossilized {cmd.slot}")
            else:
                raise IllegalTransition("seed", cmd.slot, self.kasmina.slots[cmd.slot].stage, cmd.kind)
        except (IllegalTransition, GateRejected, BlueprintLoadError) as exc:
            self._command_event(cmd, accepted=False, stage="kasmina", reason=str(exc))
            self.controller.aborted(cmd.command_id, str(exc))
            return False
        self._command_event(cmd, accepted=True, stage="applied", reason=cmd.reason)
        self.controller.applied(cmd)
        return True

    def _command_event(self, cmd: Any, *, accepted: bool, stage: str, reason: str, **extra: Any) -> None:
        self.commands["accepted" if accepted else "rejected"] += 1
        body = {k: v for k, v in cmd.to_dict().items() if k != "reason"}
        self.emit("tamiyo", "command.accepted" if accepted else "command.rejected",
                  "INFO" if accepted else "WARNING", stage=stage, reason=reason, command=body, **extra)

    # ------------------------------------------------------------ optimizer
    def rebuild_optimizer(self, why: str) -> None:
        """Rebuild param groups after seed parameters changed, carrying every group's settings and state."""
        self._check_ownership()
        self.optimizer, report = rebuild_optimizer(self.optimizer, self.cfg.trainer, self.kasmina.param_groups())
        self.emit("tolaria", "optimizer.rebuilt", "INFO", reason=why, **report.to_dict())

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained parameter by name; cached between optimizer rebuilds (the only time it changes)."""
        if self._named_cache is not None:
            return self._named_cache
        named = list(self.host.named_parameters())
        for s in self.kasmina.slots.values():
            if s.module is not None:
                named.extend((f"{s.name}.{n}", p) for n, p in s.module.named_parameters())
        self._named_cache = named
        return named

    # ---------------------------------------------------------------- records
    def _metrics_row(self, epoch: int, stats: EpochStats, val_loss: float, val_acc: float,
                     decisions: dict[str, int]) -> dict[str, Any]:
        stages = Counter(s.stage for s in self.kasmina.slots.values())
        return {
            "epoch": epoch,
            "global_step": self.global_step,
            "train_loss": stats.loss_sum / stats.seen if stats.seen else None,
            "train_accuracy": stats.correct / stats.seen if stats.seen else None,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            "params": self.kasmina.total_params(),
            "seeds_by_stage": dict(sorted(stages.items())),
            "lr": self.optimizer.param_groups[0]["lr"],
            "skipped_steps": stats.skipped,
            "emergency_level": self.emergency.level,
            "commands": decisions,
            "step_time_ms": round(sum(stats.step_ms) / max(len(stats.step_ms), 1), 4),  # wall-clock
        }

    def _fail(self, exc: BaseException, exit_code: int | None = None) -> None:
        self.failure = {"type": type(exc).__name__, "message": str(exc), "epoch": self.epoch,
                        "global_step": self.global_step,
                        "exit_code": int(exit_code if exit_code is not None else
                                         exc.exit_code if isinstance(exc, EsperError) else ExitCode.INTERNAL),
                        "traceback": traceback.format_exc()}
        self.emit("tolaria", "run.failed", "CRITICAL", **self.failure)
        if self.machine.may("fail"):
            self.machine.fire("fail", reason=f"{type(exc).__name__}: {exc}")

    def _telemetry_lost(self, exc: TelemetryDeliveryError) -> None:
        """A CRITICAL event could not be made durable (E-4): halt; the record goes to summary.json instead."""
        self.machine.observer = None  # its events cannot be delivered either
        self.failure = {"type": type(exc).__name__, "message": str(exc), "epoch": self.epoch,
                        "global_step": self.global_step, "exit_code": int(ExitCode.HALTED),
                        "traceback": traceback.format_exc()}
        if self.machine.may("halt"):
            self.machine.fire("halt", reason=f"telemetry delivery failed: {exc}")

    def _on_trainer_change(self, record: TransitionRecord) -> None:
        level = "CRITICAL" if record.dest in ("FAILED", "HALTED", "STOPPED") else "INFO"
        self.emit("tolaria", "trainer.transition", level, transition=record.to_dict())

    def exit_code(self) -> int:
        if self.failure is not None:
            return int(self.failure["exit_code"])
        if self.machine.state == "STOPPED":
            return int(ExitCode.SIGINT if self.stop_signal == signal.SIGINT else ExitCode.SIGTERM)
        return int({"COMPLETED": ExitCode.OK, "HALTED": ExitCode.HALTED}.get(self.machine.state, ExitCode.INTERNAL))

    def finish(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        records = self.kasmina.records() if hasattr(self, "kasmina") else []
        summary = {
            "run_id": self.run_id,
            "status": self.machine.state,
            "exit_code": self.exit_code(),
            "epochs_completed": len(self.history),
            "global_step": self.global_step,
            "final": {"val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
                      "params": last.get("params")},
            "seeds": [{k: r[k] for k in ("slot", "layer", "stage", "blueprint", "seed_id", "alpha", "history")}
                      for r in records],
            "emergency_level": self.emergency.level if hasattr(self, "emergency") else None,
            "emergencies": self.emergency.history() if hasattr(self, "emergency") else [],
            "rollbacks": self.rollbacks,
            "faults": self.faults.fired,
            "commands": dict(self.commands),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "failure": self.failure,
            "run_dir": str(self.run_dir.path),
            "versions": {"esper": esper.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        self.run_dir.write_summary(summary)
        if self.machine.observer is not None:
            self.emit("tolaria", "run.finished", "INFO" if summary["exit_code"] == 0 else "CRITICAL",
                      status=summary["status"], exit_code=summary["exit_code"])
            self.emitter.close()
        return summary


def _flip_byte(path: Path) -> None:
    """Drill fault: corrupt one byte in the middle of a file, in place."""
    with open(path, "r+b") as fh:
        fh.seek(0, os.SEEK_END)
        middle = fh.tell() // 2
        fh.seek(middle)
        byte = fh.read(1)
        fh.seek(middle)
        fh.write(bytes([byte[0] ^ 0xFF]))
        fh.flush()
        os.fsync(fh.fileno())
