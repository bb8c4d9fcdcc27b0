"""What a run shows and writes down about itself: the reporter interface the CLI implements, the metrics row of
an epoch (T-9), the failure record, and the summary (``summary.json``, SPEC §8)."""

from __future__ import annotations

import platform
import sysconfig
import traceback
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import torch

import esper
from esper.core.data import Task
from esper.core.dist import run_record
from esper.core.errors import EsperError, ExitCode
from esper.core.kasmina import Kasmina
from esper.core.tolaria.builder import Parts
from esper.core.tolaria.train_state import EpochStats


class Reporter(Protocol):
    """What the CLI shows while training; the trainer never prints."""

    def epoch_start(self, epoch: int, steps: int) -> None: ...
    def step(self, loss: float) -> None: ...
    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None: ...
    def notice(self, text: str) -> None: ...  # something the operator must see between epoch lines (a rollback)


class Silent:
    """A reporter that shows nothing (``--json``, tests, drills)."""

    def epoch_start(self, epoch: int, steps: int) -> None:
        pass

    def step(self, loss: float) -> None:
        pass

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        pass

    def notice(self, text: str) -> None:
        pass


def slot_views(slots: list[dict[str, Any]], blend: dict[str, dict[str, Any]] | None = None
               ) -> list[dict[str, Any]]:
    """Each slot as an operator's view shows it (the ``slots`` of ``epoch.completed``: watch, TensorBoard, the
    live table), with the epoch's blend telemetry (``alpha_mean``, ``gate_sparsity``) of a blended seed."""
    keys = ("slot", "layer", "seed_id", "blueprint", "stage", "alpha", "epochs_in_stage")
    blend = blend or {}
    return [{**{k: s.get(k) for k in keys},
             **{k: v for k, v in blend.get(str(s.get("slot")), {}).items() if k in ("alpha_mean", "gate_sparsity")}}
            for s in slots]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def metrics_row(epoch: int, global_step: int, stats: EpochStats, task: Task, val: dict[str, float],
                kasmina: Kasmina, optimizer: torch.optim.Optimizer, level: str,
                decisions: dict[str, int], compute: dict[str, Any] | None = None) -> dict[str, Any]:
    """One epoch's row: ``train_loss``/``train_<metric>`` and ``val_loss``/``val_<metric>`` of the task (C1), and
    ``compute``: the run's cumulative FLOPs and training seconds at the epoch's end (``ComputeMeter.row``)."""
    stages = Counter(s.stage for s in kasmina.slots.values())
    # per seed blended in this epoch: mean alpha, and gate sparsity for channel/confidence (Kasmina arch 1); the
    # key is there only when one was, so rows of epochs without blending are what they always were
    blend = {s.name: t for s in kasmina.slots.values() if (t := s.blend_telemetry()) is not None}
    return {
        "epoch": epoch,
        "global_step": global_step,
        **stats.means(task.metrics),
        **val,
        "params": kasmina.total_params(),
        "seeds_by_stage": dict(sorted(stages.items())),
        "lr": optimizer.param_groups[0]["lr"],
        "skipped_steps": stats.skipped,
        "emergency_level": level,
        "commands": decisions,
        **({"blend": blend} if blend else {}),
        "step_time_ms": round(stats.mean_step_ms, 4),  # wall-clock
        **(compute or {}),
    }


def failure_record(exc: BaseException, parts: Parts | None, exit_code: int | None = None) -> dict[str, Any]:
    """The failure as summary.json and the ``run.failed`` event carry it (call inside the ``except``)."""
    code = exit_code if exit_code is not None else exc.exit_code if isinstance(exc, EsperError) else ExitCode.INTERNAL
    return {"type": type(exc).__name__, "message": str(exc), "epoch": parts.state.epoch if parts else 0,
            "global_step": parts.state.global_step if parts else 0, "exit_code": int(code),
            "raised_at": raised_at(exc), "traceback": traceback.format_exc()}


_ESPER_DIR = Path(esper.__file__).resolve().parent
_LIBRARY_DIRS = tuple({Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib",
                                                                          "platlib")})


def raised_at(exc: BaseException) -> dict[str, Any] | None:
    """Where the exception came from, for the operator: the innermost frame of the user's own code (a plug-in
    host, dataset or blueprint: neither Esper nor an installed library) when there is one, else the innermost
    frame, with ``origin`` saying whose code it is."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None

    def origin(filename: str) -> str:
        path = Path(filename).resolve()
        if path.is_relative_to(_ESPER_DIR):
            return "esper"
        if filename.startswith("<") or any(path.is_relative_to(d) for d in _LIBRARY_DIRS):
            return "library"
        return "user"

    frame = next((f for f in reversed(frames) if origin(f.filename) == "user"), frames[-1])
    return {"file": frame.filename, "line": frame.lineno, "function": frame.name, "origin": origin(frame.filename)}


def summary(run_id: str, status: str, exit_code: int, parts: Parts | None, failure: dict[str, Any] | None,
            run_dir: str, task: Task | None = None, *, started: str | None = None) -> dict[str, Any]:
    """``summary.json`` (also when the run failed before its parts were built). ``started``: the UTC of this
    session's start record, so a reader can tell this summary from an earlier session's (a resume)."""
    history = parts.state.history if parts else []
    last = history[-1] if history else {}
    checkpoint = parts.checkpointer.last if parts else None
    described = task.describe() if task is not None else None
    final = {k: last.get(k) for k in (described["metrics"] if described else ("val_loss",))}
    return {
        "run_id": run_id,
        "status": status,
        "exit_code": exit_code,
        "epochs_completed": len(history),
        "global_step": parts.state.global_step if parts else 0,
        "task": described,
        "final": {**final, "params": last.get("params")},
        "seeds": [{k: r[k] for k in ("slot", "layer", "stage", "blueprint", "seed_id", "alpha", "history")}
                  for r in (parts.kasmina.records() if parts else [])],
        "emergency_level": parts.emergency.level if parts else None,
        "emergencies": parts.emergency.history() if parts else [],
        "rollbacks": parts.state.rollbacks if parts else [],
        "skipped_batches": parts.skips.state_dict()["skipped"] if parts else [],
        "faults": parts.faults.fired if parts else [],
        "commands": dict(parts.state.commands) if parts else {},
        "growth": parts.decisions.growth() if parts and parts.decisions else None,
        "precision": parts.precision.describe() if parts else None,  # fp16: steps the loss scaler skipped
        "compute": parts.compute.describe() if parts else None,  # FLOPs and training seconds (issue 24)
        "checkpoint": str(checkpoint) if checkpoint else None,
        "checkpointing": parts.checkpointer.describe() if parts else None,  # its share of the loop's time
        "failure": failure,
        "run_dir": run_dir,
        "world": run_record(Path(run_dir)),  # None in a world of one; rank 0 lists every rank's own files
        "started": started,
        "finished": utc_now(),
        "versions": {"esper": esper.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
