"""Worker-process side of Tamiyo for the mediator (``controller.isolation = "process"``).

The mediator builds the controller with ``make_worker(**factory_args)`` (JSON arguments) and calls
``decide(payload)``: the payload carries the controller state in, the reply carries the new state out, so
the parent stays the single owner of the state and a killed worker loses nothing.
"""

from __future__ import annotations

from typing import Any

from esper.core.config import ControllerConfig, SeedsConfig
from esper.core.tamiyo.controller import Tamiyo
from esper.core.tamiyo.errors import TamiyoError

FACTORY = "esper.core.tamiyo.worker:make_worker"


def factory_args(controller: ControllerConfig, seeds: SeedsConfig, run_id: str) -> dict[str, Any]:
    """The JSON arguments for ``make_worker`` (give them to the mediator with ``FACTORY``)."""
    return {"controller": controller.model_dump(mode="json"), "seeds": seeds.model_dump(mode="json"),
            "run_id": run_id}


class TamiyoWorker:
    """Keeps nothing between requests: every ``decide`` starts from the state in its payload."""

    def __init__(self, controller: ControllerConfig, seeds: SeedsConfig, run_id: str) -> None:
        self._tamiyo = Tamiyo(controller, seeds, run_id)

    def decide(self, payload: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(payload, dict) or set(payload) != {"state", "observation"}:
            raise TamiyoError("a decide payload must be {'state': ..., 'observation': ...}")
        self._tamiyo.load_state_dict(payload["state"])
        decision, state = self._tamiyo.propose(payload["observation"])
        return {"decision": decision.to_dict(), "state": state.to_dict()}


def make_worker(controller: dict[str, Any], seeds: dict[str, Any], run_id: str) -> TamiyoWorker:
    """Factory the worker process calls once: the config is resolved here, once per worker."""
    return TamiyoWorker(ControllerConfig.model_validate(controller), SeedsConfig.model_validate(seeds), run_id)
