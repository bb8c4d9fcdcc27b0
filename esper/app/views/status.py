"""Where a run stands (V-2, V-3): finished (its ``summary.json`` says how), running (a live writer holds its lock)
or incomplete (no live writer and no summary of the last session: the writer was killed or crashed). And the row
``esper runs`` shows for it.

A resumed run keeps the previous session's ``summary.json`` until it writes its own, so a summary counts only
when no session started after it (``summary.started`` against the start records; summaries written before that
field existed are taken as they are).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.app.views import read
from esper.app.views.history import RunHistory, as_int, as_str
from esper.core.errors import ExitCode

RUNNING = "RUNNING"
INCOMPLETE = "INCOMPLETE"


@dataclass
class Run:
    """Everything the views know of one run directory, read once."""

    path: Path
    history: RunHistory
    summary: dict[str, Any] | None
    config: dict[str, Any] | None
    problems: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> Run:
        history = RunHistory()
        p1 = read.stream_jsonl(path, read.EVENTS, lambda lines: history.feed_events(x.record for x in lines))
        p2 = read.stream_jsonl(path, read.METRICS, lambda lines: history.feed_metrics(x.record for x in lines))
        summary, p3 = read.read_summary(path)
        config, p4 = read.read_config(path)
        return cls(path, history, summary, config, [*p1, *p2, *p3, *p4])

    @property
    def run_id(self) -> str:
        if self.summary is not None and as_str(self.summary.get("run_id")):
            return str(self.summary["run_id"])
        return self.path.name

    @property
    def planned_epochs(self) -> int | None:
        planned = self.history.planned_epochs
        if planned is None and self.config is not None and isinstance(self.config.get("trainer"), dict):
            planned = as_int(self.config["trainer"].get("epochs"))
        return planned


def current_summary(summary: dict[str, Any] | None, history: RunHistory) -> dict[str, Any] | None:
    """The summary when it is the last session's (None when absent or an earlier session's)."""
    if summary is None:
        return None
    started = summary.get("started")
    if isinstance(started, str) and any(s.utc > started for s in history.sessions):
        return None
    return summary


@dataclass(frozen=True)
class State:
    status: str
    exit_code: int | None
    summary: dict[str, Any] | None


def state(run: Run, alive: bool) -> State:
    """Finished (the summary's status and exit code), RUNNING, or INCOMPLETE (exit code ``ExitCode.INCOMPLETE``)."""
    summary = current_summary(run.summary, run.history)
    if alive:
        return State(RUNNING, None, None)
    if summary is not None:
        status = as_str(summary.get("status")) or "UNKNOWN"
        code = as_int(summary.get("exit_code"))
        return State(status, code if code is not None else int(ExitCode.INTERNAL), summary)
    return State(INCOMPLETE, int(ExitCode.INCOMPLETE), None)


def row(run: Run, alive: bool) -> dict[str, Any]:
    """One run as ``esper runs`` lists it."""
    h = run.history
    st = state(run, alive)
    task = h.task
    best, best_epoch = h.best(h.primary, task["direction"])
    ckpt = read.check_checkpoint(run.path)
    durations = [d for d in (s.duration_s() for s in h.sessions) if d is not None]
    return {
        "run_id": run.run_id,
        "path": str(run.path),
        "status": st.status,
        "exit_code": st.exit_code,
        "epochs_done": h.epochs_done,
        "epochs_planned": run.planned_epochs,
        "primary_metric": h.primary,
        "direction": task["direction"],
        "best": best,
        "best_epoch": best_epoch,
        "final": h.final(h.primary),
        "seeds_fossilized": h.fossilized(),
        "checkpoint": ckpt.path if ckpt.ok else None,
        "checkpoint_check": {"ok": ckpt.ok, "path": ckpt.path, "detail": ckpt.detail},
        "started": h.sessions[0].utc if h.sessions else h.first_utc,
        "duration_s": round(sum(durations), 3) if durations else None,
        "sessions": len(h.sessions),
        "problems": run.problems,
    }
