"""Starting a run: :func:`train` (one run, new or resumed, with graceful SIGINT/SIGTERM) and :func:`open_trainer`
(a built trainer to drive step by step, as the bench does)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from esper.core.checkpoint import LoadedCheckpoint
from esper.core.config import EsperConfig
from esper.core.records.rundir import RunDir
from esper.core.records.telemetry import Emitter
from esper.core.tolaria import records
from esper.core.tolaria.injector import FaultEntry
from esper.core.tolaria.signals import graceful_signals
from esper.core.tolaria.trainer import Trainer


def train(cfg: EsperConfig, run_dir: RunDir, *, reporter: records.Reporter | None = None,
          emitter: Emitter | None = None, resume: LoadedCheckpoint | None = None,
          faults: Sequence[FaultEntry] = (), commit: Callable[[], None] | None = None) -> dict[str, Any]:
    """One training run, new or resumed, with SIGINT/SIGTERM stopping it gracefully; returns the summary.

    With ``commit``, the trainer is opened first (built, and restored on a resume) and a failure there raises,
    typed, with nothing written; ``commit()`` then makes the run directory the run's (its config, the held
    events) before training starts."""
    trainer = Trainer(cfg, run_dir, reporter=reporter, emitter=emitter, faults=faults)
    with graceful_signals(trainer.stop):
        if commit is not None:
            trainer.open(resume)
            try:
                commit()
            except BaseException:
                trainer.close()
                raise
        return trainer.run(resume=resume)


def open_trainer(cfg: EsperConfig, run_dir: RunDir, *, emitter: Emitter | None = None) -> Trainer:
    """A built trainer to drive step by step (``train_step``, ``evaluate``, ``parts``); ``close()`` it after."""
    trainer = Trainer(cfg, run_dir, emitter=emitter)
    trainer.build()
    return trainer
