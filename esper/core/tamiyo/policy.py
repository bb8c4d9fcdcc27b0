"""Policies turn an observation into proposals. The controller, not the policy, stamps ids and times on them,
so no policy (built-in or plug-in) can fabricate a command id."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.config.plugins import call_factory, check_type, load_factory
from esper.core.tamiyo.errors import ObservationError
from esper.core.tamiyo.observation import Observation, SlotView
from esper.core.tamiyo.state import ControllerState


@dataclass(frozen=True)
class Proposal:
    """A command the policy wants, before it has an id; ``reason`` for people, ``reason_code`` for tools."""

    kind: Literal["germinate", "cull", "fossilize"]
    slot: str
    blueprint: str | None
    reason: str
    reason_code: str


@runtime_checkable
class Policy(Protocol):
    """Anything with a pure ``decide``: the same observation and state always give the same proposals."""

    def decide(self, obs: Observation, state: ControllerState) -> list[Proposal]: ...


def relative_improvement(old: float, new: float) -> float:
    """(old - new) / |old|; a zero old loss has no room to improve, so it counts as no improvement."""
    if old == 0.0:
        return 0.0
    return (old - new) / abs(old)


class HeuristicPolicy:
    """T-6: germinate on a validation-loss plateau, fossilize when the counterfactual gain holds up, cull
    seeds that stall or regress."""

    def __init__(self, controller: ControllerConfig, seeds: SeedsConfig) -> None:
        self._c = controller
        self._s = seeds
        self._slot_order = [s.name for s in seeds.slots]

    def plateaued(self, state: ControllerState) -> tuple[bool, str]:
        """Whether validation loss plateaued over ``plateau_window`` epochs, with the measured numbers."""
        w = self._c.plateau_window
        if state.observed_epochs <= self._c.warmup_epochs:
            return False, f"warm-up ({state.observed_epochs}/{self._c.warmup_epochs} epochs observed)"
        if len(state.history) < w + 1:
            return False, f"plateau window not full ({len(state.history)}/{w + 1} epochs)"
        old = state.history[-1 - w].metrics
        new = state.history[-1].metrics
        rel = relative_improvement(old.val_loss, new.val_loss)
        detail = (f"val loss {old.val_loss:.4g} (epoch {old.epoch}) -> {new.val_loss:.4g} "
                  f"(epoch {new.epoch}): {rel:+.2%} < {self._c.plateau_min_delta:.2%}")
        return rel < self._c.plateau_min_delta, detail

    def decide(self, obs: Observation, state: ControllerState) -> list[Proposal]:
        out: list[Proposal] = []
        for name in self._slot_order:
            proposal = self._judge_seed(obs.slot(name))
            if proposal is not None:
                out.append(proposal)
        return out + self._germinations(obs, state)

    def fits(self, slot: SlotView, blueprint: str, state: ControllerState) -> bool:
        """Whether ``blueprint`` in ``slot`` is within seeds.param_budget and not refused under this budget."""
        budget = self._s.budget
        if slot.candidate_params.get(blueprint, budget + 1) > budget:
            return False
        return not any(r.slot == slot.name and r.blueprint == blueprint and r.budget == budget for r in state.refused)

    def _judge_seed(self, slot: SlotView) -> Proposal | None:
        if not slot.alive:
            return None
        if slot.stage == "PROBATIONARY" and slot.epochs_in_stage >= self._s.probation_epochs:
            gain = slot.counterfactual_gain
            if gain is None:
                raise ObservationError(
                    f"slot {slot.name!r}: PROBATIONARY for {slot.epochs_in_stage} epochs but "
                    "no counterfactual_gain")
            floor = self._c.fossilize_min_improvement
            if gain >= floor:
                return Proposal("fossilize", slot.name, slot.blueprint,
                                f"counterfactual gain {gain:.4g} >= {floor:.4g} after "
                                f"{slot.epochs_in_stage} probation epochs", "proven")
            return Proposal("cull", slot.name, slot.blueprint,
                            f"regressed: counterfactual gain {gain:.4g} < {floor:.4g} after "
                            f"{slot.epochs_in_stage} probation epochs", "regressed")
        if slot.epochs_in_stage >= self._c.stall_epochs:
            return Proposal("cull", slot.name, slot.blueprint,
                            f"stalled: {slot.epochs_in_stage} epochs in {slot.stage} "
                            f"(limit {self._c.stall_epochs})", "stalled")
        return None

    def _germinations(self, obs: Observation, state: ControllerState) -> list[Proposal]:
        alive = sum(1 for s in obs.slots if s.alive)
        if alive >= self._s.max_active:
            return []
        usable = [b for b in self._s.blueprints if b not in state.regressed_blueprints]
        # a free slot counts only with a usable blueprint that accepts its kind and fits the budget there, and
        # not a pair refused before under the same budget: never propose a misfit or ask twice for a refusal
        options = {n: [b for b in usable if b in obs.slot(n).compatible and self.fits(obs.slot(n), b, state)]
                   for n in self._slot_order if obs.slot(n).stage == "DORMANT"}
        free = [n for n, bps in options.items() if bps]
        if not free:
            return []
        if self._c.grow_when == "epoch":
            due = [(slot, self._grow_epoch(slot)) for slot in free]
            due = [(slot, at) for slot, at in due if state.observed_epochs >= at]
            # every slot that is due at once, in config order
            return [self._proposal(slot, options[slot], state, f"schedule: {state.observed_epochs} epochs done >= "
                                   f"controller.grow_at_epoch {at} for slot {slot}", "schedule")
                    for slot, at in due[: self._s.max_active - alive]]
        plateau, detail = self.plateaued(state)
        if not plateau:
            return []
        # Round-robin by past germinations; ties go to config order, so the choice is deterministic.
        slot = min(free, key=lambda n: (state.germinations_by_slot.get(n, 0), self._slot_order.index(n)))
        return [self._proposal(slot, options[slot], state, f"plateau: {detail}", "plateau")]

    def _grow_epoch(self, slot: str) -> int:
        at = self._c.grow_at_epoch  # resolved to epochs by the builder (a percentage needs trainer.epochs)
        if isinstance(at, dict):
            at = at[slot]
        if not isinstance(at, int):
            raise ObservationError(f"controller.grow_at_epoch {at!r} is relative: resolve it with grow_epochs()")
        return at

    def _proposal(self, slot: str, usable: list[str], state: ControllerState, reason: str, trigger: str
                  ) -> Proposal:
        blueprint = min(usable, key=lambda b: (state.germinations_by_blueprint.get(b, 0),
                                               self._s.blueprints.index(b)))
        return Proposal("germinate", slot, blueprint, reason, trigger)


PolicyFactory = Callable[[ControllerConfig, SeedsConfig], Policy]


def build_policy(controller: ControllerConfig, seeds: SeedsConfig) -> Policy:
    """``heuristic`` or a ``module:function`` factory called with (controller, seeds) config."""
    if controller.policy == "heuristic":
        return HeuristicPolicy(controller, seeds)
    factory = load_factory(controller.policy, "controller.policy")
    made = call_factory(factory, controller.policy, "controller.policy", controller, seeds)
    policy: Policy = check_type(made, Policy, controller.policy, "controller.policy")
    return policy
