"""Operator requests delivered through the run directory (``esper emergency clear``), served by the running
trainer at a step boundary: each is applied through the emergency table's own transition, or refused, and
answered with an event (source ``cli``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from esper.core.records import requests
from esper.core.tolaria.emergency import EmergencyManager


def serve(run_dir: Path, run_id: str, emergency: EmergencyManager, emit: Callable[..., Any], *,
          stale: bool = False) -> None:
    """Answer every waiting request; ``stale``: written before this process started, so never applied."""
    for name, req, why in requests.take(run_dir):
        before = emergency.level
        answer: dict[str, Any] = {"request_id": req.request_id if req else None, "file": name,
                                  "kind": req.kind if req else None, "level_before": before, "level_after": before}
        if req is None:
            outcome, detail = "invalid", why
        elif stale:
            outcome, detail = "stale", "written before this process started; never applied"
        elif req.run_id != run_id:
            outcome, detail = "rejected", f"the request is for run {req.run_id!r}, not this one"
        elif not emergency.machine.may("clear"):
            outcome, detail = "rejected", f"the emergency level is {before}: there is nothing to clear"
        else:
            emergency.operator_clear(f"operator: {req.reason}")
            outcome, detail = "applied", f"cleared by the operator: {req.reason}"
            answer["level_after"] = emergency.level
        emit("cli", requests.EVENT, "CRITICAL" if outcome == "applied" else "WARNING", outcome=outcome,
             detail=detail, reason=req.reason if req else None, **answer)
