"""Worker-process side of Tamiyo for the mediator (``controller.isolation = "process"``).

The mediator builds the controller with ``make_worker(**factory_args)`` (JSON arguments) and calls
``decide(payload)``: the payload carries the controller state in, the reply carries the new state out, so
the parent stays the single owner of the state and a killed worker loses nothing.
"""

from __future__ import annotations

import time
from typing import Any

from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.tamiyo.controller import Tamiyo
from esper.core.tamiyo.errors import TamiyoError
from esper.core.tamiyo.observation import Observation
from esper.core.tamiyo.policy import Policy, Proposal
from esper.core.tamiyo.state import ControllerState

FACTORY = "esper.core.tamiyo.worker:make_worker"


def factory_args(controller: ControllerConfig, seeds: SeedsConfig, run_id: str) -> dict[str, Any]:
    """The JSON arguments for ``make_worker`` (give them to the mediator with ``FACTORY``)."""
    return {"controller": controller.model_dump(mode="json"), "seeds": seeds.model_dump(mode="json"),
            "run_id": run_id}


# Drill faults a decide payload may carry (E-1): they act inside the real worker process.
INJECTIONS = ("hang", "crash", "illegal_command")


class _IllegalOnce:
    """Wraps the policy for one decision and adds a command the seed lifecycle forbids (fossilize DORMANT)."""

    def __init__(self, inner: Policy) -> None:
        self.inner = inner

    def decide(self, obs: Observation, state: ControllerState) -> list[Proposal]:
        dormant = [s.name for s in obs.slots if s.stage == "DORMANT"] or [obs.slots[0].name]
        return [*self.inner.decide(obs, state),
                Proposal("fossilize", dormant[0], None, "injected fault: illegal_command", "injected")]


class TamiyoWorker:
    """Keeps nothing between requests: every ``decide`` starts from the state in its payload."""

    def __init__(self, controller: ControllerConfig, seeds: SeedsConfig, run_id: str) -> None:
        self._tamiyo = Tamiyo(controller, seeds, run_id)

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(payload, dict) or not {"state", "observation"} <= set(payload) <= {
                "state", "observation", "inject"}:
            raise TamiyoError("a decide payload must be {'state': ..., 'observation': ..., ['inject': ...]}")
        inject = payload.get("inject")
        if inject is not None and inject not in INJECTIONS:
            raise TamiyoError(f"unknown injection {inject!r}; known: {INJECTIONS}")
        if inject == "hang":
            while True:  # a controller that really hangs: only the mediator's kill ends this
                time.sleep(3600)
        if inject == "crash":
            raise RuntimeError("injected fault: controller_crash")
        self._tamiyo.load_state_dict(payload["state"])
        policy = self._tamiyo.policy
        if inject == "illegal_command":
            self._tamiyo.policy = _IllegalOnce(policy)
        try:
            decision, state = self._tamiyo.propose(payload["observation"])
        finally:
            self._tamiyo.policy = policy
        return {"decision": decision.to_dict(), "state": state.to_dict()}


def make_worker(controller: dict[str, Any], seeds: dict[str, Any], run_id: str) -> TamiyoWorker:
    """Factory the worker process calls once: the config is resolved here, once per worker."""
    return TamiyoWorker(ControllerConfig.model_validate(controller), SeedsConfig.model_validate(seeds), run_id)
