"""Following a run as it grows (``esper watch``, V-2): tails ``events.jsonl`` and ``metrics.jsonl`` by offset (each
poll reads only what was appended), keeps the run's story up to date, and says when the run has ended and how.

The writer's lock is probed *before* the files are read: once the probe finds no writer, everything it wrote is
already on disk, so the last read is complete. The run has ended when no writer holds the lock and
``summary.json`` is the last session's (its status and exit code are the outcome), or when no writer holds it
any more and there is no such summary (INCOMPLETE: killed or crashed). A directory no writer has locked yet is a
run still starting: the caller decides how long to wait for one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.app.views import read
from esper.app.views.history import RunHistory
from esper.app.views.status import Run, State, current_summary, state


@dataclass
class Update:
    rows: list[dict[str, Any]] = field(default_factory=list)  # epoch rows new since the last poll, in order
    reset: bool = False  # metrics.jsonl was rewritten (a resume): rows restart from the file's first
    skipped: list[str] = field(default_factory=list)  # lines that are not records (torn, garbled), reported once


class Follower:
    def __init__(self, run: Path) -> None:
        self.run = run
        self.history = RunHistory()
        self._events = read.Tail(run / read.EVENTS)
        self._metrics = read.Tail(run / read.METRICS)
        self.seen_writer = False
        self._config, _ = read.read_config(run)

    @property
    def planned_epochs(self) -> int | None:
        """What the last session plans (its start record), else the run's config.toml."""
        return Run(self.run, self.history, None, self._config).planned_epochs

    def _drain(self, tail: read.Tail, update: Update) -> None:
        """Feed what is new, one bounded read at a time: a long run's 200 MB of events never sits in memory."""
        more = True
        while more:
            got = tail.poll()
            if got.reset and tail is self._metrics:
                update.reset, update.rows = True, []
                self.history.reset_metrics()
            if tail is self._metrics:
                update.rows += self.history.feed_metrics(line.record for line in got.lines)
            else:
                self.history.feed_events(line.record for line in got.lines)
            update.skipped += [f"{tail.path.name} {s.where()}: {s.detail}" for s in got.skipped] + got.problems
            more = got.more

    def poll(self) -> Update:
        update = Update()
        self._drain(self._events, update)
        self._drain(self._metrics, update)
        return update

    def step(self) -> tuple[Update, State | None]:
        """Read what is new; the run's final state once it has ended (None while it runs or has not started)."""
        alive = read.writer_alive(self.run)
        update = self.poll()
        if alive:
            self.seen_writer = True
            return update, None
        if not (self.seen_writer or read.had_writer(self.run)) and read.read_summary(self.run)[0] is None:
            return update, None  # no writer has locked it yet: still starting
        for tail in (self._events, self._metrics):  # the writer is gone: an unfinished line is torn for good
            torn = tail.finish()
            update.skipped += [f"{tail.path.name} {s.where()}: {s.detail}" for s in torn.skipped]
            if tail is self._metrics:
                update.rows += self.history.feed_metrics(line.record for line in torn.lines)
            else:
                self.history.feed_events(line.record for line in torn.lines)
        summary, problems = read.read_summary(self.run)
        update.skipped += problems
        run = Run(self.run, self.history, current_summary(summary, self.history), None)
        return update, state(run, alive=False)
