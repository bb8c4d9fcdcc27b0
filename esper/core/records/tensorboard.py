"""Optional TensorBoard output (V-4): with ``telemetry.tensorboard = true`` a run also writes its scalars (losses,
metrics, learning rate, parameters, emergency level, alpha per seed and a blended seed's ``alpha_mean`` and
``gate_sparsity``) and its lifecycle and emergency events (as text) into ``RUN/tensorboard/`` through
``torch.utils.tensorboard``: ``tensorboard --logdir runs``.

The ``tensorboard`` package is an optional extra (``pip install 'esper[tensorboard]'``). Whether it is there is
asked before anything is written (``loggers.require``: a clear exit 3 when it is not), and
``torch.utils.tensorboard``, which needs it, is imported only when the feature is on. Per-step scalars come from
``train.step`` events (``telemetry.log_every_steps``).

The writer is a subscriber of the run's one emitter: everything it writes comes from the records the run
reports, so TensorBoard never shows what ``events.jsonl`` does not hold.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from esper.core.records.scalars import scalars
from esper.statemachines import EMERGENCY

DIRNAME = "tensorboard"
# records written as text: the lifecycle, emergencies and what the operator would want on the timeline
TEXT_EVENTS = frozenset({
    "run.started", "run.resuming", "run.finished", "run.failed", "seed.transition", "command.accepted",
    "command.rejected", "emergency.level", "rollback.completed", "rollback.failed", "checkpoint.written",
    "checkpoint.failed", "checkpoint.corrupt_detected", "fault.injected", "stop.requested",
})


class TensorBoardWriter:
    """Turns the emitter's records into TensorBoard scalars and text; ``close()`` flushes the event file."""

    def __init__(self, log_dir: Path) -> None:
        module = importlib.import_module("torch.utils.tensorboard")  # optional: present once require() passed
        self.log_dir = log_dir
        self._writer = module.SummaryWriter(log_dir=str(log_dir))

    def __call__(self, record: dict[str, Any]) -> None:
        event, attrs = record["event"], record["attributes"]
        epoch = record["epoch"] or 0
        if event == "epoch.completed":
            self._epoch(epoch, attrs)
        elif event == "train.step":  # telemetry.log_every_steps
            for key in ("train_loss", "lr"):
                self._writer.add_scalar(f"step/{key}", attrs[key], global_step=attrs["global_step"])
        if event in TEXT_EVENTS:
            text = f"`{record['utc']}` **{record['level']}** {event}: {json.dumps(attrs, sort_keys=True)}"
            self._writer.add_text(f"events/{event}", text, global_step=epoch)

    def _epoch(self, epoch: int, row: dict[str, Any]) -> None:
        for key, value in scalars(row).items():
            if key == "global_step":  # the x axis here is the epoch
                continue
            group = "loss" if key.endswith("_loss") else "metric" if key.startswith(("train_", "val_")) else "run"
            self._writer.add_scalar(f"{group}/{key}", value, global_step=epoch)
        level = row.get("emergency_level")
        if isinstance(level, str) and level in EMERGENCY.state_names:
            self._writer.add_scalar("run/emergency_level", EMERGENCY.value_of(level), global_step=epoch)
        for slot in row.get("slots") or []:
            if not isinstance(slot, dict):
                continue
            # alpha at the epoch's end, and a blended seed's blend telemetry over the epoch
            for key in ("alpha", "alpha_mean", "gate_sparsity"):
                value = slot.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{key}/{slot['slot']}", value, global_step=epoch)

    def close(self) -> None:
        self._writer.close()

