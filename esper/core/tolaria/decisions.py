"""The controller in the loop (SPEC T-6, T-7, T-12): once per epoch, an observation goes to Tamiyo through the
mediator; accepted commands are applied through Kasmina, rejected ones become events; due field reports are
filed. A decision that times out or crashes is a CONSERVATIVE signal, never a pause command."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from esper.core.data import Task
from esper.core.kasmina import BlueprintLoadError, GateResult, Kasmina, LossFn
from esper.core.tamiyo import Command, FieldReportLog, Tamiyo
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.injector import FaultInjector
from esper.core.tolaria.mediator import ControllerCrashed, ControllerTimeout, Mediator
from esper.core.tolaria.optimizer import OptimizerPart
from esper.core.tolaria.train_state import EpochStats, TrainState
from esper.statemachines import GateRejected, IllegalTransition


class Decisions:
    """Asks the controller, applies what it decides, files its field reports."""

    def __init__(self, run_id: str, controller: Tamiyo, mediator: Mediator, kasmina: Kasmina,
                 optimizer: OptimizerPart, state: TrainState, reports: FieldReportLog, faults: FaultInjector,
                 probe: tuple[torch.Tensor, torch.Tensor], task: Task, signal: Callable[[Signal], None],
                 emit: Callable[..., Any]) -> None:
        self.run_id = run_id
        self.controller = controller
        self.mediator = mediator
        self.kasmina = kasmina
        self.optimizer = optimizer
        self.state = state
        self.reports = reports
        self.faults = faults
        self.probe = probe
        self.task = task
        self.loss: LossFn = task.loss
        self.signal = signal  # safety.handle
        self.emit = emit
        self.last_observation: dict[str, Any] | None = None  # what the run's last decision saw (for T-12 at its end)
        # germinations this process tried and how many grew a TRAINING seed; a run where none did says so
        self.germinations = {"attempted": 0, "grown": 0}
        self.germination_failures: list[str] = []

    def decide(self, epoch: int, stats: EpochStats, val: dict[str, float]) -> dict[str, int]:
        """One epoch's decision; returns how many commands were accepted and rejected."""
        out = {"accepted": 0, "rejected": 0}
        if stats.seen == 0:
            self.emit("tamiyo", "controller.skipped", "WARNING", reason="no healthy training step this epoch")
            return out
        obs = self.observation(epoch, stats, val)
        payload = self.controller.payload(obs)
        injection = self.faults.controller()
        if injection is not None:
            payload["inject"] = injection
        try:
            decision = self.controller.adopt(self.mediator.decide("decide", payload))
        except (ControllerTimeout, ControllerCrashed) as exc:
            # a failure, not a pause command (T-7): the level machine pauses the trainer
            cause = "controller_timeout" if isinstance(exc, ControllerTimeout) else "controller_crash"
            self.signal(Signal("CONSERVATIVE", cause, str(exc), {}))
            return out
        for rej in decision.rejected:
            self._command_event(rej.command, accepted=False, stage=rej.stage, reason=rej.reason,
                                limit=rej.limit, deferred=rej.deferred)
            out["rejected"] += 1
            if rej.stage == "validator":  # the controller asked for something the lifecycle forbids
                self.signal(Signal("NOTICE", "illegal_command", rej.reason, {"command_id": rej.command.command_id}))
        for cmd in decision.accepted:
            out["accepted" if self.apply(cmd) else "rejected"] += 1
        if decision.accepted:
            obs = self.observation(epoch, stats, val)  # stages changed by applied commands
        self.last_observation = obs
        self._file(self.controller.observe_outcomes(obs))
        return out

    def file_short_reports(self, why: str) -> None:
        """The run ended: every report window still open is judged now, over the epochs it had (T-12)."""
        if self.last_observation is not None:
            self._file(self.controller.close_windows(self.last_observation), why=why)

    def _file(self, reports: list[Any], why: str | None = None) -> None:
        for report in reports:
            written = self.reports.append(report)  # False: already on disk (a resumed run re-files it)
            extra = {"ended": why} if why else {}
            self.emit("tamiyo", "field_report.filed", "INFO", written=written, **extra, **report.to_dict())

    def observation(self, epoch: int, stats: EpochStats, val: dict[str, float]) -> dict[str, Any]:
        """What the controller sees at the end of ``epoch``: every validation metric of the task, which one is
        primary and its direction (the policy judges plateaus by ``val_loss``)."""
        slots = []
        for s in self.kasmina.slots.values():
            losses = s.stats.epoch_losses
            slots.append({
                "name": s.name, "stage": s.stage, "blueprint": s.blueprint,
                "epochs_in_stage": s.stats.epochs_in_stage, "alpha": s.alpha,
                "seed_loss_improvement": ((losses[0] - losses[-1]) / max(abs(losses[0]), 1e-12)
                                          if len(losses) >= 2 else None),
                "counterfactual_gain": s.stats.counterfactual.get("gain"),
                **self.kasmina.slot_view(s.name),
            })
        return {
            "run_id": self.run_id, "epoch": epoch,
            "train_loss": stats.loss_sum / stats.seen,
            "val_loss": val["val_loss"], "val_metrics": {k: v for k, v in val.items() if k != "val_loss"},
            "primary_metric": self.task.primary_metric, "direction": self.task.direction,
            "step_latency_ms": stats.mean_step_ms,
            "rollbacks_total": len(self.state.rollbacks),
            "total_params": self.kasmina.total_params(),
            "slots": slots,
        }

    def apply(self, cmd: Command) -> bool:
        """Apply an accepted command through Kasmina; a gate, lifecycle or load refusal becomes an event."""
        k = self.kasmina
        try:
            if cmd.kind == "germinate":
                self.germinate(cmd.slot, cmd.blueprint, cmd.reason)  # type: ignore[arg-type]  # G0 refuses None
            elif cmd.kind == "cull":
                k.cull(cmd.slot, cmd.reason)
                self.optimizer.rebuild(f"culled {cmd.slot}")
            elif cmd.kind == "fossilize":
                k.fossilize(cmd.slot, cmd.reason)
                self.optimizer.rebuild(f"fossilized {cmd.slot}")
            else:
                raise IllegalTransition("seed", cmd.slot, k.slots[cmd.slot].stage, cmd.kind)
        except (IllegalTransition, GateRejected, BlueprintLoadError) as exc:
            self._command_event(cmd, accepted=False, stage="kasmina", reason=str(exc))
            self.controller.aborted(cmd.command_id, str(exc))
            if cmd.kind == "germinate":
                self._germination(grown=False, why=str(exc))
            return False
        self._command_event(cmd, accepted=True, stage="applied", reason=cmd.reason)
        self.controller.applied(cmd)
        return True

    def germinate(self, slot: str, blueprint: str, reason: str) -> GateResult:
        """DORMANT -> GERMINATED through G0, then the G1 probe: TRAINING when it passes, culled when not.
        Returns G1's result; G0 or the lifecycle refusing raises (nothing changed then)."""
        k = self.kasmina
        k.germinate(slot, blueprint, reason)
        self.optimizer.rebuild(f"germinated {slot}")
        result = k.probe_g1(slot, *self.probe, self.loss)
        self._germination(grown=result.passed, why=f"G1 failed: {result.reason}")
        if result.passed:
            k.start_training(slot, result, reason=result.reason)
        else:
            k.gate_failed(slot, "start_training", result)  # a failed gate is a gate event like a passed one
            k.cull(slot, reason=f"G1 failed: {result.reason}")
            self.optimizer.rebuild(f"culled {slot}")
        return result

    def _germination(self, *, grown: bool, why: str) -> None:
        self.germinations["attempted"] += 1
        self.germinations["grown"] += int(grown)
        if not grown and len(self.germination_failures) < 5:
            self.germination_failures.append(why)

    def growth(self) -> dict[str, Any]:
        """What the summary says about growth: attempts, seeds grown, and a warning when every attempt failed."""
        out: dict[str, Any] = {**self.germinations, "failures": list(self.germination_failures), "warning": None,
                               "unfit_slots": dict(self.kasmina.unfit)}
        if self.germinations["attempted"] and not self.germinations["grown"]:
            out["warning"] = (f"every germination failed ({self.germinations['attempted']} attempt(s)); growth "
                              f"never happened. First reason: {self.germination_failures[0]}")
        elif not self.germinations["attempted"] and self.kasmina.unfit:
            out["warning"] = (f"nothing grew: {len(self.kasmina.unfit)} of {len(self.kasmina.slots)} slot(s) have no "
                              f"blueprint within the budget; "
                              + "; ".join(self.kasmina.unfit.values()))
        return out

    def _command_event(self, cmd: Command, *, accepted: bool, stage: str, reason: str, **extra: Any) -> None:
        self.state.commands["accepted" if accepted else "rejected"] += 1
        body = {k: v for k, v in cmd.to_dict().items() if k != "reason"}
        self.emit("tamiyo", "command.accepted" if accepted else "command.rejected",
                  "INFO" if accepted else "WARNING", stage=stage, reason=reason, command=body, **extra)
