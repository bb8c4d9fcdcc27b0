"""Tamiyo: policy -> risk -> validator each epoch, plus the bookkeeping that turns applied commands into field
reports. Pure Python (no torch) so it can run in a worker process; all carried state lives in one store."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ValidationError

from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.tamiyo._util import describe, utc_now_iso
from esper.core.tamiyo.commands import Command, command_id
from esper.core.tamiyo.errors import ObservationError, TamiyoError
from esper.core.tamiyo.observation import ALIVE_STAGES, Observation
from esper.core.tamiyo.policy import Policy, Proposal, build_policy
from esper.core.tamiyo.reports import FieldReport, Outcome, classify, report_id_for
from esper.core.tamiyo.risk import PARAM_BUDGET, RiskHistory, RiskStage
from esper.core.tamiyo.state import (
    AwaitingCommand,
    ControllerState,
    ControllerStateStore,
    EpochMetrics,
    EpochRecord,
    RefusedPair,
    ReportWindow,
)
from esper.core.tamiyo.validator import ValidationContext, validate
from esper.statemachines import SEED


@dataclass(frozen=True)
class Rejection:
    """A proposed command that was not accepted: by which stage, why, and (risk only) which limit."""

    command: Command
    stage: Literal["risk", "validator"]
    reason: str
    limit: str = ""
    deferred: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"command": self.command.to_dict(), "stage": self.stage, "reason": self.reason,
                "limit": self.limit, "deferred": self.deferred}


@dataclass(frozen=True)
class Decision:
    """One epoch's decision: each proposal is either accepted or rejected (with its reason), never dropped."""

    epoch: int
    proposed: tuple[Command, ...]
    accepted: tuple[Command, ...]
    rejected: tuple[Rejection, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "proposed": [c.to_dict() for c in self.proposed],
                "accepted": [c.to_dict() for c in self.accepted],
                "rejected": [r.to_dict() for r in self.rejected]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Decision:
        """Rebuild a decision sent back from a worker process; malformed input is a TamiyoError."""
        try:
            rejected = tuple(Rejection(Command.from_dict(r["command"]), r["stage"], r["reason"], r["limit"],
                                       bool(r["deferred"])) for r in data["rejected"])
            return cls(int(data["epoch"]), tuple(Command.from_dict(c) for c in data["proposed"]),
                       tuple(Command.from_dict(c) for c in data["accepted"]), rejected)
        except (KeyError, TypeError) as exc:
            raise TamiyoError(f"malformed decision: {exc!r}") from exc


def _metrics(obs: Observation) -> EpochMetrics:
    return EpochMetrics(epoch=obs.epoch, train_loss=obs.train_loss, val_loss=obs.val_loss, **obs.val_metrics)


class Tamiyo:
    """The controller of one run. Build once per run from the resolved config sections.

    Per epoch the trainer calls ``decide(obs)``, applies the accepted commands, calls ``applied(cmd)`` (or
    ``aborted(cmd_id, reason)`` when applying failed), then ``observe_outcomes(obs)`` and writes the returned
    field reports. ``state_dict()``/``load_state_dict()`` are what checkpoints store.
    """

    def __init__(self, controller: ControllerConfig, seeds: SeedsConfig, run_id: str, *,
                 policy: Policy | None = None, clock: Callable[[], str] = utc_now_iso) -> None:
        if not run_id:
            raise TamiyoError("Tamiyo needs a non-empty run id")
        self._c = controller
        self._s = seeds
        self.run_id = run_id
        self.policy = policy if policy is not None else build_policy(controller, seeds)
        self.risk = RiskStage(controller, seeds)
        self.store = ControllerStateStore(run_id)
        self._clock = clock
        self._slot_names = [s.name for s in seeds.slots]
        # Enough history for the plateau, volatility and rollback windows; older records are dropped.
        self._history_limit = max(controller.plateau_window + 1, controller.risk.volatility_window,
                                  controller.risk.rollback_window_epochs + 1)

    # --- persistence -------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return self.store.to_dict()

    def load_state_dict(self, data: Any) -> None:
        """Restore a checkpointed state (exact resume); a bad state is a ControllerStateError."""
        self.store.restore(data)

    def payload(self, obs: Observation | Mapping[str, Any]) -> dict[str, Any]:
        """The JSON request for a decision in a worker (see ``esper.core.tamiyo.worker``). The observation is
        validated here, so a broken one is an ObservationError in the trainer, not a worker crash."""
        if not isinstance(obs, Observation):
            obs = Observation.from_dict(obs)
        self._check(obs, self.store.view())
        return {"state": self.state_dict(), "observation": obs.to_dict()}

    def adopt(self, reply: Mapping[str, Any]) -> Decision:
        """Commit a worker's reply to ``payload``: its decision and the state it leads to. A reply that never
        arrives (timeout) is never adopted, so the stored state stays where it was."""
        if not isinstance(reply, Mapping) or set(reply) != {"decision", "state"}:
            raise TamiyoError("a worker reply must be {'decision': ..., 'state': ...}")
        state = ControllerState.from_dict(reply["state"])
        decision = Decision.from_dict(reply["decision"])
        self.store.commit(state)
        return decision

    # --- decisions ---------------------------------------------------------------------------------------

    def decide(self, obs: Observation | Mapping[str, Any]) -> Decision:
        decision, state = self.propose(obs)
        self.store.commit(state)
        return decision

    def propose(self, obs: Observation | Mapping[str, Any]) -> tuple[Decision, ControllerState]:
        """The decision and the state it leads to, without committing: a caller that abandons a late decision
        (T-7) simply never commits it."""
        if not isinstance(obs, Observation):
            obs = Observation.from_dict(obs)
        state = self.store.working_copy()
        self._check(obs, state)
        self._record(obs, state)
        commands = [self._stamp(p, obs.epoch, state) for p in self.policy.decide(obs, state)]
        ctx = ValidationContext.build(self._s, self.run_id, obs.epoch, frozenset(state.issued_ids), obs.slots)
        history = RiskHistory(tuple(state.history), state.rollbacks_before_history)
        stages = dict(obs.stages)
        accepted: list[Command] = []
        rejected: list[Rejection] = []
        tried: set[tuple[str, str | None]] = set()
        queue = list(commands)
        while queue:
            cmd = queue.pop(0)
            tried.add((cmd.slot, cmd.blueprint))
            verdict = self.risk.assess(cmd, obs, history, accepted)
            if not verdict.accepted:
                rejected.append(Rejection(cmd, "risk", verdict.reason, verdict.limit, verdict.deferred))
            else:
                result = validate(cmd, stages, ctx)
                if result.ok:
                    # Later commands of the same decision see this slot where this command leaves it.
                    dest = SEED.destination(stages[cmd.slot], cmd.kind)
                    assert dest is not None
                    stages[cmd.slot] = dest
                    accepted.append(cmd)
                    continue
                rejected.append(Rejection(cmd, "validator", result.reason))
            if cmd.kind == "germinate" and (rejected[-1].stage == "validator" or rejected[-1].limit == PARAM_BUDGET):
                # refused for this pair itself (not for the moment): remember it and ask for the next pair now
                self._refuse(state, cmd, rejected[-1].reason)
                retry = [self._stamp(p, obs.epoch, state) for p in self.policy.decide(obs, state)
                         if p.kind == "germinate" and (p.slot, p.blueprint) not in tried]
                queue.extend(retry[:1])
                commands.extend(retry[:1])
        state.issued_ids.extend(c.command_id for c in commands)
        state.awaiting.extend(AwaitingCommand(command=c, before=_metrics(obs)) for c in accepted)
        return Decision(obs.epoch, tuple(commands), tuple(accepted), tuple(rejected)), state

    def _refuse(self, state: ControllerState, cmd: Command, reason: str) -> None:
        assert cmd.blueprint is not None  # a germinate names its blueprint
        state.refused.append(RefusedPair(slot=cmd.slot, blueprint=cmd.blueprint, budget=self._s.budget,
                                         epoch=cmd.epoch, reason=reason))

    def _check(self, obs: Observation, state: ControllerState) -> None:
        if obs.run_id != self.run_id:
            raise ObservationError(
                f"observation of run {obs.run_id!r} given to the controller of {self.run_id!r}")
        if state.last_epoch is not None and obs.epoch <= state.last_epoch:
            raise ObservationError(
                f"observation epoch {obs.epoch} is not after the last one ({state.last_epoch}); "
                "after a rollback call rewind() first")
        seen = set(obs.stages)
        missing = [n for n in self._slot_names if n not in seen]
        extra = sorted(seen - set(self._slot_names))
        if missing or extra:
            raise ObservationError(
                f"observation slots do not match seeds.slots: missing {missing}, unknown {extra}")
        if state.awaiting:
            ids = [a.command.command_id for a in state.awaiting]
            raise TamiyoError(f"commands {ids} were accepted but never reported as applied() or aborted()")

    def _record(self, obs: Observation, state: ControllerState) -> None:
        state.history.append(EpochRecord(metrics=_metrics(obs), rollbacks_total=obs.rollbacks_total))
        while len(state.history) > self._history_limit:
            state.rollbacks_before_history = state.history.pop(0).rollbacks_total
        state.observed_epochs += 1
        state.last_epoch = obs.epoch

    def _stamp(self, proposal: Proposal, epoch: int, state: ControllerState) -> Command:
        if not isinstance(proposal, Proposal):
            raise TamiyoError(f"policy returned {type(proposal).__name__}, not a Proposal")
        cid = command_id(epoch, state.next_seq)
        state.next_seq += 1
        try:
            return Command(command_id=cid, run_id=self.run_id, epoch=epoch, kind=proposal.kind,
                           slot=proposal.slot, blueprint=proposal.blueprint, reason=proposal.reason,
                           reason_code=proposal.reason_code, issued_at=self._clock())
        except ValidationError as exc:
            raise TamiyoError(f"policy proposed a malformed command ({cid}): {describe(exc)}") from exc

    # --- application feedback and field reports ----------------------------------------------------------

    def applied(self, cmd: Command | str) -> None:
        """The trainer applied an accepted command: open its report window."""
        cid = cmd if isinstance(cmd, str) else cmd.command_id
        state = self.store.working_copy()
        entry = next((a for a in state.awaiting if a.command.command_id == cid), None)
        if entry is None:
            raise TamiyoError(f"applied({cid}): not an accepted command awaiting application")
        state.awaiting.remove(entry)
        c = entry.command
        if c.kind == "germinate":
            assert c.blueprint is not None
            by_bp, by_slot = state.germinations_by_blueprint, state.germinations_by_slot
            by_bp[c.blueprint] = by_bp.get(c.blueprint, 0) + 1
            by_slot[c.slot] = by_slot.get(c.slot, 0) + 1
        if c.kind == "cull":
            if c.reason_code == "regressed" and c.blueprint and c.blueprint not in state.regressed_blueprints:
                state.regressed_blueprints.append(c.blueprint)
            for window in state.windows:
                same_seed = window.command.slot == c.slot and window.command.kind == "germinate"
                if same_seed and not window.aborted_reason:
                    window.aborted_reason = f"seed culled by {c.command_id}: {c.reason}"
        state.windows.append(ReportWindow(command=c, before=entry.before, applied_epoch=c.epoch,
                                          due_epoch=c.epoch + self._c.report_window_epochs))
        self.store.commit(state)

    def aborted(self, cmd_id: str, reason: str) -> None:
        """A command failed to apply (no report: it never took effect) or its effect was undone before its
        window ended (its report will be ABORTED)."""
        if not reason:
            raise TamiyoError("aborted() needs a reason")
        state = self.store.working_copy()
        entry = next((a for a in state.awaiting if a.command.command_id == cmd_id), None)
        if entry is not None:
            state.awaiting.remove(entry)
            if entry.command.kind == "germinate":  # refused when applied (G0, a load failure): not asked again
                self._refuse(state, entry.command, reason)
        else:
            window = next((w for w in state.windows if w.command.command_id == cmd_id), None)
            if window is None:
                raise TamiyoError(f"aborted({cmd_id}): no such accepted command or open report window")
            window.aborted_reason = window.aborted_reason or reason
        self.store.commit(state)

    def rewind(self, to_epoch: int, reason: str) -> None:
        """After a rollback to the end of ``to_epoch``: forget later history, abort commands applied after it.
        Ids issued so far stay used, so commands after the rollback never reuse one."""
        state = self.store.working_copy()
        kept = [r for r in state.history if r.metrics.epoch <= to_epoch]
        state.observed_epochs -= len(state.history) - len(kept)
        state.history = kept
        if state.last_epoch is not None and state.last_epoch > to_epoch:
            state.last_epoch = to_epoch
        state.awaiting.clear()
        for window in state.windows:
            if window.applied_epoch > to_epoch and not window.aborted_reason:
                window.aborted_reason = f"rolled back to epoch {to_epoch}: {reason}"
        self.store.commit(state)

    def observe_outcomes(self, obs: Observation | Mapping[str, Any]) -> list[FieldReport]:
        """File the reports that are due at this observation (call after ``decide`` and ``applied``)."""
        if not isinstance(obs, Observation):
            obs = Observation.from_dict(obs)
        state = self.store.working_copy()
        if obs.epoch != state.last_epoch or obs.run_id != self.run_id:
            raise TamiyoError(f"observe_outcomes needs the observation just decided on (epoch "
                              f"{state.last_epoch}), got epoch {obs.epoch} of run {obs.run_id!r}")
        stages = obs.stages
        reports: list[FieldReport] = []
        kept: list[ReportWindow] = []
        for window in state.windows:
            report = self._judge(window, obs, stages)
            if report is None:
                kept.append(window)
            else:
                reports.append(report)
        state.windows = kept
        state.reports_filed += len(reports)
        self.store.commit(state)
        return reports

    def close_windows(self, obs: Observation | Mapping[str, Any]) -> list[FieldReport]:
        """The run ended (T-12): file a short-window report for every window still open at this last observation,
        judged over the epochs it had, and close them."""
        if not isinstance(obs, Observation):
            obs = Observation.from_dict(obs)
        state = self.store.working_copy()
        reports = []
        for window in state.windows:
            report = self._judge(window, obs, obs.stages, short=True)
            assert report is not None  # a short judgement always files
            reports.append(report)
        state.windows = []
        state.reports_filed += len(reports)
        self.store.commit(state)
        return reports

    def _judge(self, window: ReportWindow, obs: Observation, stages: Mapping[str, str], *,
               short: bool = False) -> FieldReport | None:
        cmd = window.command
        abort = window.aborted_reason
        if abort is None and window.applied_epoch < obs.epoch:
            stage = stages[cmd.slot]
            if cmd.kind == "germinate" and stage not in ALIVE_STAGES | {"FOSSILIZED"}:
                abort = f"seed left the lifecycle (slot in {stage}) before the window ended"
            elif cmd.kind == "fossilize" and stage != "FOSSILIZED":
                abort = f"fossilized seed is gone (slot in {stage}) before the window ended"
        after = _metrics(obs)
        if abort is not None:
            outcome, why = Outcome.ABORTED, abort
        elif obs.epoch >= window.due_epoch:
            outcome, why = classify(window.before, after, self._c.plateau_min_delta, obs.primary_metric,
                                    obs.direction)
        elif not short:
            return None
        elif obs.epoch > window.applied_epoch:
            outcome, why = classify(window.before, after, self._c.plateau_min_delta, obs.primary_metric,
                                    obs.direction)
            why = f"short window ({obs.epoch - window.applied_epoch} of {self._c.report_window_epochs} epochs): {why}"
        else:
            outcome, why = Outcome.NEUTRAL, (f"short window: the run ended at epoch {obs.epoch}, the epoch the "
                                             "command was applied; nothing to judge")
        return FieldReport(report_id=report_id_for(cmd.command_id, short=short), run_id=self.run_id,
                           command_id=cmd.command_id, kind=cmd.kind, slot=cmd.slot, blueprint=cmd.blueprint,
                           outcome=outcome,
                           outcome_reason=why, applied_epoch=window.applied_epoch,
                           window_epochs=self._c.report_window_epochs, metrics_before=window.before,
                           metrics_after=after, issued_at=self._clock(), short_window=short)
