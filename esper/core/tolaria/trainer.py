"""Tolaria: the training loop, driven by the trainer lifecycle (L-3)."""

from __future__ import annotations

import json
import platform
import signal
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

import esper
from esper.core.checkpoint import CheckpointWriteError, LoadedCheckpoint, write_checkpoint
from esper.core.config import EsperConfig
from esper.core.data import Dataset, batches, build_dataset, steps_per_epoch
from esper.core.errors import EsperError, ExitCode
from esper.core.host import build_host, layer_widths
from esper.core.kasmina.kasmina import Kasmina
from esper.core.kasmina.slot import LIVE, Mode, SeedForwardError
from esper.core.optim import LRSchedule, build_optimizer, rebuild_optimizer
from esper.core.rundir import RunDir, append_jsonl, write_atomic
from esper.core.tamiyo import FieldReportLog
from esper.core.telemetry import Emitter
from esper.core.tolaria.emergency import EmergencyManager, Signal
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


class Trainer:
    """Builds the run's parts from one config and drives epochs through the trainer machine."""

    def __init__(
        self,
        cfg: EsperConfig,
        run_dir: RunDir,
        *,
        reporter: Reporter | None = None,
        emitter: Emitter | None = None,
        controller_factory: Callable[[EsperConfig, str], Any] | None = None,
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

    # ------------------------------------------------------------------ build
    def build(self) -> None:
        cfg = self.cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        torch.use_deterministic_algorithms(True)
        self.device = torch.device(cfg.run.device)
        self.data: Dataset = build_dataset(cfg)
        self.host: nn.Module = build_host(cfg, self.data.n_features, self.data.n_classes).to(self.device)
        slots = [s.layer for s in cfg.seeds.slots] if cfg.seeds.enabled else []
        widths = layer_widths(self.host, slots, self.data.n_features)
        self.kasmina = Kasmina(cfg if cfg.seeds.enabled else cfg.model_copy(update={"seeds": cfg.seeds.model_copy(
            update={"slots": []})}), self.host, widths, self.emit)
        self.optimizer = build_optimizer(cfg.trainer, self.kasmina.param_groups())
        self.steps_per_epoch = steps_per_epoch(self.data, cfg.data.batch_size)
        self.schedule = LRSchedule(cfg.trainer, cfg.trainer.epochs * self.steps_per_epoch)
        self.emergency = EmergencyManager(cfg.emergency, self.emit)
        self.controller = self._controller_factory(cfg, self.run_id) if (
            self._controller_factory and cfg.seeds.enabled) else None
        self.report_log = FieldReportLog(self.run_dir.field_reports)
        n = min(len(self.data.x_train), cfg.data.batch_size)
        self.probe = (self.data.x_train[:n].to(self.device), self.data.y_train[:n].to(self.device))

    # -------------------------------------------------------------------- run
    def run(self, resume: LoadedCheckpoint | None = None) -> dict[str, Any]:
        """Train to completion (or failure); always returns the summary and writes summary.json."""
        self.emit("tolaria", "run.started" if resume is None else "run.resuming", "INFO",
                  config_hash=self.cfg.config_hash(), esper=esper.__version__, torch=torch.__version__)
        try:
            self.build()
            start = Position(0, 0, 0)
            if resume is not None:
                start = restore(self, resume.tensors, resume.payload)
                self.last_checkpoint = resume.path
                self._rewrite_metrics()
                self.emit("tolaria", "resumed", "CRITICAL", checkpoint=str(resume.path), epoch=start.epochs_done,
                          step_in_epoch=start.step_in_epoch, global_step=start.global_step)
            self.machine.fire("ready", reason="built from config" if resume is None else f"restored {resume.path}")
            for epoch in range(start.epochs_done + 1, self.cfg.trainer.epochs + 1):
                self.epoch = epoch
                skip = start.step_in_epoch if epoch == start.epochs_done + 1 else 0
                if not self._run_epoch(epoch, skip):
                    break
            else:
                self.machine.fire("complete", reason=f"{self.cfg.trainer.epochs} epochs done")
        except KeyboardInterrupt:
            # second SIGINT: abort now; checkpoints are atomic, so `latest` still verifies
            self._fail(KeyboardInterrupt("aborted by a second interrupt"), exit_code=ExitCode.SIGINT)
        except Exception as exc:  # noqa: BLE001 - recorded as FAILED (never swallowed): exit code follows
            self._fail(exc)
        return self.finish()

    def _run_epoch(self, epoch: int, skip: int) -> bool:
        """One epoch; returns False when an operator stop ended the run inside it."""
        self.emitter.set_context(epoch=epoch, step=self.global_step)
        self.machine.fire("train", reason=f"epoch {epoch}" + (f" from step {skip}" if skip else ""))
        stats = self._train_epoch(epoch, skip)
        if stats is None:
            return False
        self.machine.fire("validate", reason=f"end of epoch {epoch}")
        val_loss, val_acc = self.evaluate(frozenset())
        changed = self.kasmina.end_epoch(self.evaluate)
        if changed:
            self._rebuild_optimizer(f"automatic lifecycle changes in {changed}")
        decisions = self._decide(epoch, stats, val_loss, val_acc)
        self.emergency.end_epoch()
        row = self._metrics_row(epoch, stats, val_loss, val_acc, decisions)
        self.history.append(row)
        append_jsonl(self.run_dir.metrics, row)
        self.emit("tolaria", "epoch.completed", "INFO", **{k: v for k, v in row.items() if k != "epoch"})
        self.stats = None
        if epoch % self.cfg.checkpoint.every_epochs == 0 or epoch == self.cfg.trainer.epochs:
            self.machine.fire("checkpoint", reason=f"every {self.cfg.checkpoint.every_epochs} epoch(s)")
            self.write_checkpoint(Position(epoch, 0, self.global_step), "periodic")
        self.reporter.epoch_end(row, self.kasmina.records())
        return True

    # ------------------------------------------------------------ checkpoints
    def write_checkpoint(self, pos: Position, reason: str) -> Path | None:
        """Write a verified checkpoint; a failure is a CRITICAL event (and HALT after too many in a row)."""
        tensors, payload = capture(self, pos, reason)
        delay = self.cfg.checkpoint.commit_delay_ms / 1000.0
        try:
            path = write_checkpoint(self.run_dir.checkpoints, checkpoint_name(pos, reason), tensors, payload,
                                    keep_last=self.cfg.checkpoint.keep_last,
                                    before_commit=(lambda _tmp: time.sleep(delay)) if delay else None)
        except CheckpointWriteError as exc:
            self.checkpoint_failures += 1
            self.emit("tolaria", "checkpoint.failed", "CRITICAL", reason=reason, error=str(exc),
                      consecutive_failures=self.checkpoint_failures, kept=str(self.last_checkpoint))
            if self.checkpoint_failures >= self.cfg.emergency.max_checkpoint_failures:
                self.emergency.escalate("HALT", f"{self.checkpoint_failures} checkpoint writes failed in a row")
            else:
                self.emergency.escalate("NOTICE", f"checkpoint write failed: {exc}")
            return None
        self.checkpoint_failures = 0
        self.last_checkpoint = path
        self.emit("tolaria", "checkpoint.written", "INFO", path=str(path), reason=reason, epoch=pos.epochs_done,
                  step_in_epoch=pos.step_in_epoch, global_step=pos.global_step)
        return path

    def _rewrite_metrics(self) -> None:
        """On resume, metrics.jsonl is the checkpoint's history; rows after it are redone, not duplicated."""
        lines = [row for row in self.history]
        old = self.run_dir.metrics.read_text().splitlines() if self.run_dir.metrics.exists() else []
        if len(old) > len(lines):
            self.emit("tolaria", "metrics.rewound", "WARNING", dropped_rows=len(old) - len(lines),
                      reason="rows after the resumed checkpoint are recomputed")
        write_atomic(self.run_dir.metrics, "".join(json.dumps(r, default=str) + "\n" for r in lines))

    def partial_stats(self) -> dict[str, Any] | None:
        if self.stats is None:
            return None
        return dict(self.stats.__dict__)

    def restore_partial_stats(self, d: dict[str, Any] | None) -> None:
        self.stats = EpochStats(**d) if d is not None else None

    def rebuild_optimizer_fresh(self) -> None:
        self.optimizer = build_optimizer(self.cfg.trainer, self.kasmina.param_groups())

    # ----------------------------------------------------------------- epochs
    def _train_epoch(self, epoch: int, skip: int) -> EpochStats | None:
        self.host.train()
        if skip == 0 or self.stats is None:
            self.stats = EpochStats()
        stats = self.stats
        self.reporter.epoch_start(epoch, self.steps_per_epoch)
        training_slots = [s for s in self.kasmina.slots.values() if s.stage == "TRAINING"]
        for index, (x, y) in enumerate(batches(self.data, self.cfg.data.batch_size, self.cfg.run.seed, epoch)):
            if index < skip:
                continue
            if self.stop_signal is not None:
                self._graceful_stop(epoch, index)
                return None
            self.emitter.set_context(epoch=epoch, step=self.global_step)
            self.step_in_epoch = index
            self.train_step(x, y, stats, training_slots)
        if self.stop_signal is not None and epoch < self.cfg.trainer.epochs:
            self._graceful_stop(epoch, self.steps_per_epoch)
            return None
        return stats

    def train_step(self, x: torch.Tensor, y: torch.Tensor, stats: EpochStats,
                   training_slots: list[Any] | None = None) -> bool:
        """One optimizer step with every safety check; returns whether the step was applied."""
        t0 = time.perf_counter()
        if training_slots is None:
            training_slots = [s for s in self.kasmina.slots.values() if s.stage == "TRAINING"]
        x, y = x.to(self.device), y.to(self.device)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            logits = self.kasmina.forward(x)
        except SeedForwardError as exc:
            self._signal(Signal("ELEVATED", "seed_forward_error", str(exc), {"slot": exc.slot}), stats,
                         cull=exc.slot)
            return False
        loss = _loss(logits, y)
        value = float(loss.detach())
        signal_ = self.emergency.check_loss(value)
        if signal_ is not None:
            self._signal(signal_, stats)
            return False
        loss.backward()
        for slot in training_slots:
            self.kasmina.seed_pass(slot, x, y, _loss)
        signal_ = self.emergency.check_grads(self._named_params())
        if signal_ is not None:
            self._signal(signal_, stats)
            return False
        if self.cfg.trainer.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                           self.cfg.trainer.grad_clip)
        self.schedule.apply(self.optimizer, self.global_step)
        self.optimizer.step()
        self.global_step += 1
        self.kasmina.after_step()
        self.emergency.accept_loss(value)
        correct = int((logits.detach().argmax(dim=1) == y).sum())
        stats.add(value, correct, len(y), (time.perf_counter() - t0) * 1000.0)
        self.reporter.step(value)
        return True

    def _graceful_stop(self, epoch: int, index: int) -> None:
        """SIGINT/SIGTERM: the current step is finished; write a checkpoint, then STOPPED."""
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "signal"
        self.emit("tolaria", "stop.requested", "CRITICAL", signal=name, epoch=epoch, step_in_epoch=index)
        self.machine.fire("checkpoint", reason=f"{name}: graceful stop")
        pos = Position(epoch - 1, index, self.global_step)
        self.write_checkpoint(pos, "graceful_stop")
        self.machine.fire("stop", reason=f"{name} after a graceful checkpoint")

    def _signal(self, signal: Signal, stats: EpochStats, cull: str | None = None) -> None:
        """A detected problem: the bad step is not applied; the level machine decides the action."""
        self.optimizer.zero_grad(set_to_none=True)
        stats.skipped += 1
        self.emergency.escalate(signal.level, f"{signal.cause}: {signal.detail}", cause=signal.cause,
                                **signal.attributes)
        self.emit("tolaria", "step.skipped", "WARNING", cause=signal.cause, global_step=self.global_step)
        if cull is not None and self.kasmina.slots[cull].stage in LIVE:
            self.kasmina.cull(cull, reason=f"emergency: {signal.cause}")
            self._rebuild_optimizer(f"culled {cull} after {signal.cause}")

    @torch.no_grad()
    def evaluate(self, bypass: frozenset[str]) -> tuple[float, float]:
        """Validation loss/accuracy, optionally with some slots bypassed (counterfactual)."""
        self.host.eval()
        x, y = self.data.x_val.to(self.device), self.data.y_val.to(self.device)
        with self.kasmina.modes(Mode.BYPASS, bypass):
            logits = self.kasmina.forward(x)
        self.host.train()
        return float(_loss(logits, y)), float((logits.argmax(dim=1) == y).float().mean())

    # ------------------------------------------------------------- controller
    def _decide(self, epoch: int, stats: EpochStats, val_loss: float, val_acc: float) -> dict[str, int]:
        out = {"accepted": 0, "rejected": 0}
        if self.controller is None:
            return out
        if stats.seen == 0:
            self.emit("tamiyo", "controller.skipped", "WARNING", reason="no healthy training step this epoch")
            return out
        obs = self._observation(epoch, stats, val_loss, val_acc)
        decision = self.controller.decide(obs)
        for rej in decision.rejected:
            self._command_event(rej.command, accepted=False, stage=rej.stage, reason=rej.reason,
                                limit=rej.limit, deferred=rej.deferred)
            out["rejected"] += 1
        for cmd in decision.accepted:
            if self._apply(cmd):
                out["accepted"] += 1
            else:
                out["rejected"] += 1
        if any(cmd.kind != "cull" for cmd in decision.accepted):
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
        """Apply an accepted command through Kasmina; a gate or lifecycle refusal becomes an event."""
        try:
            if cmd.kind == "germinate":
                self.kasmina.germinate(cmd.slot, cmd.blueprint, cmd.reason)
                self._rebuild_optimizer(f"germinated {cmd.slot}")
                result = self.kasmina.probe_g1(cmd.slot, *self.probe, _loss)
                if result.passed:
                    self.kasmina.start_training(cmd.slot, result, reason=result.reason)
                else:
                    self.kasmina.cull(cmd.slot, reason=f"G1 failed: {result.reason}")
                    self._rebuild_optimizer(f"culled {cmd.slot}")
            elif cmd.kind == "cull":
                self.kasmina.cull(cmd.slot, cmd.reason)
                self._rebuild_optimizer(f"culled {cmd.slot}")
            elif cmd.kind == "fossilize":
                self.kasmina.fossilize(cmd.slot, cmd.reason)
                self._rebuild_optimizer(f"fossilized {cmd.slot}")
            else:
                raise IllegalTransition("seed", cmd.slot, self.kasmina.slots[cmd.slot].stage, cmd.kind)
        except (IllegalTransition, GateRejected) as exc:
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
    def _rebuild_optimizer(self, why: str) -> None:
        self.optimizer, report = rebuild_optimizer(self.optimizer, self.cfg.trainer, self.kasmina.param_groups())
        self.emit("tolaria", "optimizer.rebuilt", "INFO", reason=why, **report.to_dict())

    def _named_params(self) -> list[tuple[str, nn.Parameter]]:
        named = list(self.host.named_parameters())
        for s in self.kasmina.slots.values():
            if s.module is not None:
                named.extend((f"{s.name}.{n}", p) for n, p in s.module.named_parameters())
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

    def _on_trainer_change(self, record: TransitionRecord) -> None:
        level = "CRITICAL" if record.dest in ("FAILED", "HALTED") else "INFO"
        self.emit("tolaria", "trainer.transition", level, transition=record.to_dict())

    def exit_code(self) -> int:
        if self.failure is not None:
            return int(self.failure["exit_code"])
        if self.machine.state == "STOPPED":
            return int(ExitCode.SIGINT if self.stop_signal == 2 else ExitCode.SIGTERM)
        return {"COMPLETED": ExitCode.OK, "FAILED": ExitCode.INTERNAL,
                "HALTED": ExitCode.HALTED}.get(self.machine.state, ExitCode.INTERNAL)

    def finish(self) -> dict[str, Any]:
        last = self.history[-1] if self.history else {}
        summary = {
            "run_id": self.run_id,
            "status": self.machine.state,
            "exit_code": int(self.exit_code()),
            "epochs_completed": len(self.history),
            "global_step": self.global_step,
            "final": {"val_loss": last.get("val_loss"), "val_accuracy": last.get("val_accuracy"),
                      "params": last.get("params")},
            "seeds": [{k: r[k] for k in ("slot", "layer", "stage", "blueprint", "seed_id", "alpha", "history")}
                      for r in (self.kasmina.records() if hasattr(self, "kasmina") else [])],
            "emergencies": self.emergency.history() if hasattr(self, "emergency") else [],
            "rollbacks": self.rollbacks,
            "commands": dict(self.commands),
            "checkpoint": str(self.last_checkpoint) if self.last_checkpoint else None,
            "failure": self.failure,
            "run_dir": str(self.run_dir.path),
            "versions": {"esper": esper.__version__, "torch": torch.__version__,
                         "python": platform.python_version()},
        }
        self.run_dir.write_summary(summary)
        self.emit("tolaria", "run.finished", "CRITICAL" if self.failure else "INFO", status=summary["status"],
                  exit_code=summary["exit_code"])
        self.emitter.close()
        return summary
