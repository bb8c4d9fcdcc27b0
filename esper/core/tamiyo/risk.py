"""T-11 risk stage: scores each proposed command against configured limits. A breach rejects or defers the
command with a named reason; a command is never rewritten into another. Culls always pass (they lower
risk)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.tamiyo.commands import Command
from esper.core.tamiyo.observation import Observation
from esper.core.tamiyo.state import EpochRecord

# Limit names as they appear in verdicts and events.
LOSS_VOLATILITY = "loss_volatility"
STEP_LATENCY = "step_latency"
SEEDS_ACTIVE = "seeds_active"
PARAM_BUDGET = "param_budget"
RECENT_ROLLBACKS = "recent_rollbacks"


@dataclass(frozen=True)
class RiskVerdict:
    """``accepted`` or not; a refusal is ``deferred`` (retry later) or a rejection, naming the ``limit``."""

    accepted: bool
    deferred: bool
    reason: str
    limit: str

    @classmethod
    def ok(cls) -> RiskVerdict:
        return cls(True, False, "within risk limits", "")

    @classmethod
    def reject(cls, limit: str, reason: str) -> RiskVerdict:
        return cls(False, False, reason, limit)

    @classmethod
    def defer(cls, limit: str, reason: str) -> RiskVerdict:
        return cls(False, True, reason, limit)


@dataclass(frozen=True)
class RiskHistory:
    """What the risk stage looks back over: epoch records (oldest first, the current epoch last) and the
    rollback total just before the oldest record."""

    records: Sequence[EpochRecord]
    rollbacks_before: int = 0

    def recent_rollbacks(self, epoch: int, total_now: int, window: int) -> int:
        """Rollbacks in the last ``window`` epochs: the total now minus the total at ``epoch - window``."""
        baseline = self.rollbacks_before
        for rec in self.records:
            if rec.metrics.epoch <= epoch - window:
                baseline = rec.rollbacks_total
        return total_now - baseline


def loss_volatility(losses: Sequence[float]) -> float:
    """Coefficient of variation (population stdev / mean) of validation losses."""
    mean = statistics.fmean(losses)
    if mean <= 0.0:
        raise ValueError(f"volatility is undefined for a mean loss of {mean}")
    return statistics.pstdev(losses) / mean


class RiskStage:
    """Built once per run from the resolved controller and seeds config."""

    def __init__(self, controller: ControllerConfig, seeds: SeedsConfig) -> None:
        self._r = controller.risk
        self._s = seeds

    def assess(self, cmd: Command, obs: Observation, history: RiskHistory,
               accepted: Sequence[Command] = ()) -> RiskVerdict:
        """The first breached limit, checked in a fixed order; culls are never held back. ``accepted`` are the
        commands already accepted in the same decision (a second germination counts the first)."""
        if cmd.kind == "cull":
            return RiskVerdict.ok()
        for check in (self._rollbacks, self._volatility):
            verdict = check(obs, history)
            if verdict is not None:
                return verdict
        if cmd.kind == "germinate":
            for germ_check in (self._latency, self._active, self._budget):
                verdict = germ_check(cmd, obs, accepted)
                if verdict is not None:
                    return verdict
        return RiskVerdict.ok()

    def _rollbacks(self, obs: Observation, history: RiskHistory) -> RiskVerdict | None:
        window = self._r.rollback_window_epochs
        recent = history.recent_rollbacks(obs.epoch, obs.rollbacks_total, window)
        if recent > self._r.max_recent_rollbacks:
            return RiskVerdict.reject(
                RECENT_ROLLBACKS,
                f"{recent} rollbacks in the last {window} epochs > max_recent_rollbacks "
                f"{self._r.max_recent_rollbacks}")
        return None

    def _volatility(self, obs: Observation, history: RiskHistory) -> RiskVerdict | None:
        window = self._r.volatility_window
        losses = [rec.metrics.val_loss for rec in history.records][-window:]
        if len(losses) < window:
            return None  # too little history to measure; warm-up and plateau gates cover the first epochs
        try:
            cv = loss_volatility(losses)
        except ValueError as exc:
            return RiskVerdict.reject(LOSS_VOLATILITY, str(exc))
        if cv > self._r.max_loss_volatility:
            return RiskVerdict.defer(
                LOSS_VOLATILITY,
                f"val loss coefficient of variation {cv:.3g} over {window} epochs > max_loss_volatility "
                f"{self._r.max_loss_volatility}")
        return None

    def _latency(self, cmd: Command, obs: Observation, accepted: Sequence[Command]) -> RiskVerdict | None:
        if obs.step_latency_ms > self._r.max_step_latency_ms:
            return RiskVerdict.defer(
                STEP_LATENCY,
                f"step latency {obs.step_latency_ms:.1f} ms > max_step_latency_ms "
                f"{self._r.max_step_latency_ms}")
        return None

    def _active(self, cmd: Command, obs: Observation, accepted: Sequence[Command]) -> RiskVerdict | None:
        alive = sum(1 for s in obs.slots if s.alive) + sum(1 for c in accepted if c.kind == "germinate")
        if alive >= self._s.max_active:
            return RiskVerdict.reject(
                SEEDS_ACTIVE, f"{alive} seeds alive, seeds.max_active is {self._s.max_active}")
        return None

    def _budget(self, cmd: Command, obs: Observation, accepted: Sequence[Command]) -> RiskVerdict | None:
        assert cmd.blueprint is not None  # Command guarantees it for germinate
        views = {s.name: s for s in obs.slots}
        if cmd.slot not in views or cmd.blueprint not in views[cmd.slot].compatible:
            return None  # an unknown slot or a blueprint that does not fit it is the validator's rejection
        params = views[cmd.slot].candidate_params.get(cmd.blueprint)
        if params is None:
            return RiskVerdict.reject(
                PARAM_BUDGET, f"no parameter count for blueprint {cmd.blueprint!r} in slot {cmd.slot!r}")
        if params > self._s.budget:
            return RiskVerdict.reject(
                PARAM_BUDGET,
                f"blueprint {cmd.blueprint!r} in slot {cmd.slot!r} has {params} parameters > "
                f"seeds.param_budget {self._s.budget}")
        return None
