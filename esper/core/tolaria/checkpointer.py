"""The Checkpointer: when and under which name the run's state is written, re-verifying the newest checkpoint,
quarantining a corrupt one, and counting failed writes until they are a HALT (SPEC C-2, §3.4).

It captures through the components registry (the one place that knows what a checkpoint holds) and writes
through the checkpoint store (the one place that knows how). Failures come back as emergency signals for
safety to act on; nothing here changes the emergency level itself.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

import esper
from esper.core.checkpoint import (
    BEST,
    CheckpointPruneError,
    CheckpointWriteError,
    Manifest,
    latest_checkpoint,
    prune,
    verify_checkpoint,
    write_checkpoint,
    write_pointer,
)
from esper.core.checkpoint.background import BackgroundWriter
from esper.core.config import CheckpointConfig, EsperConfig
from esper.core.dist import broadcast, current
from esper.core.records.rundir import is_disk_error
from esper.core.tolaria.components import Components
from esper.core.tolaria.emergency import Signal
from esper.core.tolaria.injector import FaultInjector
from esper.core.tolaria.train_state import Position, TrainState
from esper.statemachines import StrictMachine


def checkpoint_name(pos: Position, reason: str) -> str:
    base = f"epoch-{pos.epochs_done:04d}"
    if pos.step_in_epoch:
        base += f"-step-{pos.global_step:08d}"
    return base + ("-emergency" if reason == "emergency" else "")


@dataclass(frozen=True)
class RunConfigRecord:
    """The run's whole config as every checkpoint records it (what a resume without --config trains with)."""

    toml: str
    hash: str

    @classmethod
    def of(cls, cfg: EsperConfig) -> RunConfigRecord:
        return cls(cfg.to_toml(), cfg.config_hash())


class Checkpointer:
    """Writes verified checkpoints of ``components`` into ``root``; ``last`` is the last verified one. Built from
    its own config section; ``max_failures`` is ``emergency.max_checkpoint_failures`` (failed writes in a row that
    are a HALT), ``config`` what every manifest records of the run's config."""

    def __init__(self, cfg: CheckpointConfig, root: Path, run_id: str, components: Components, state: TrainState,
                 machine: StrictMachine, faults: FaultInjector, emit: Callable[..., Any], *,
                 config: RunConfigRecord, max_failures: int, primary: tuple[str, str] = ("val_loss", "min")) -> None:
        self.cfg = cfg
        self.config = config
        self.max_failures = max_failures
        self.primary = primary  # the task's primary metric and its direction: what keep_best ranks by
        self.root = root
        self.run_id = run_id
        self.components = components
        self.state = state
        self.machine = machine
        self.faults = faults
        self.emit = emit
        self.last: Path | None = None
        self.failures = 0  # failed writes in a row
        self._quarantine: Path | None = None  # a corrupt checkpoint to move aside after the next good write
        # checkpoint.async: periodic checkpoints staged into reused buffers and written on a thread
        self.background = BackgroundWriter() if cfg.async_ else None
        self._pending: tuple[str, Position] | None = None  # the reason and position of the write in flight
        self._deferred: Signal | None = None  # a settled write's signal not yet handed to the loop (committed())
        # what checkpointing cost the loop this session: the seconds it waited in save/poll/flush/re-verification
        # and the checkpoints it wrote (summary.json `checkpointing`; `esper bench`'s checkpoint share)
        self.loop_seconds = 0.0
        self.written = 0

    @contextmanager
    def timed(self) -> Iterator[None]:
        """The loop's time inside the block counts as checkpointing."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.loop_seconds += time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        return {"written": self.written, "loop_seconds": round(self.loop_seconds, 4)}

    def capture(self, reason: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
        """Tensor files and manifest payload of the live state (format v1)."""
        tensors, parts = self.components.to_checkpoint(self.components.state_dict())
        meta = {"run_id": self.run_id, "reason": reason, "saved_at": datetime.now(UTC).isoformat(),
                "trainer_state": self.machine.state, "config_toml": self.config.toml,
                "config_hash": self.config.hash,
                "versions": {"esper": esper.__version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
        payload = {**meta, **parts}
        order = [k for k in Manifest.payload_fields() if k in payload]  # written in the order the model declares
        return tensors, {**{k: payload[k] for k in order}, **payload}

    def save(self, reason: str) -> Signal | None:
        """Rank 0 writes (see :meth:`write`); under torchrun the other ranks wait for its verified commit and
        take its outcome: the same ``last`` checkpoint and the same signal, so every rank acts alike."""
        world = current()
        if not world.active:
            return self.write(reason)
        outcome = (self.write(reason), str(self.last) if self.last else None) if world.writer else None
        signal, last = broadcast(outcome, world)
        self.last = Path(last) if last else None
        return signal

    def write(self, reason: str) -> Signal | None:
        """Write a verified checkpoint of the live state. A failure is a CRITICAL event and comes back as a
        NOTICE, or as HALT once ``max_checkpoint_failures`` writes in a row failed (but never for the
        emergency checkpoint a HALT is already writing). With ``checkpoint.async`` a periodic checkpoint is
        staged and written in the background; its outcome (the same events and signals) comes back from the
        next ``save``, ``poll`` or ``flush``. Emergency and graceful-stop checkpoints are always synchronous."""
        signal = self.flush()  # a background write in flight ends (and is settled) before the next one starts
        if reason == "emergency":
            signal = None  # a HALT is already writing this one: the settled write's events are out, its signal moot
        elif signal is not None and signal.level == "HALT":
            return signal
        pos = self.state.position
        name = checkpoint_name(pos, reason)
        current = latest_checkpoint(self.root)
        if reason == "graceful_stop" and current is not None and current.name == name:
            # `latest` already holds exactly this state (the last periodic checkpoint, or the one resumed from)
            self.last = current
            self.emit("tolaria", "checkpoint.reused", "INFO", path=str(current), reason=reason)
            return signal
        if current is not None and current.name.startswith(name) and reason != "graceful_stop":
            # this position is trained again after a rollback: `latest` is never overwritten in place
            name = f"{name}-redo-{len(self.state.rollbacks):03d}"
        tensors, payload = self.capture(reason)
        if self.background is not None and reason == "periodic":
            # the loop stalls for the copy into the staging buffers only; the write runs on its thread
            self.background.submit(self.root, name, self.background.stage(tensors), payload,
                                   keep_last=self.cfg.keep_last, before_commit=self._before_commit)
            self._pending = (reason, pos)
            self.emit("tolaria", "checkpoint.started", "INFO", name=name, reason=reason, background=True)
            return signal
        try:
            path = write_checkpoint(self.root, name, tensors, payload, keep_last=self.cfg.keep_last,
                                    before_commit=self._before_commit)
        except (CheckpointPruneError, CheckpointWriteError) as exc:
            return self._settle(reason, pos, exc) or signal
        return self._settle(reason, pos, path) or signal

    def flush(self) -> Signal | None:
        """Wait for a background write in flight and settle its outcome (nothing to do without one). A signal
        left by :meth:`committed` comes back here too."""
        deferred, self._deferred = self._deferred, None
        if self.background is None or not self.background.pending:
            return deferred
        outcome = self.background.wait()
        assert outcome is not None and self._pending is not None
        (reason, pos), self._pending = self._pending, None
        if outcome.error is not None and not isinstance(outcome.error, CheckpointPruneError | CheckpointWriteError):
            raise outcome.error  # a bug or a disk fault: as a synchronous write would have raised it
        return self._settle(reason, pos, outcome.error or outcome.path) or deferred  # type: ignore[arg-type]

    def committed(self) -> Path | None:
        """The last verified checkpoint, once a background write in flight has ended: a full rollback reads it,
        and that write's pruning must not delete it under the read. The write's signal, if any, is kept for the
        next ``save``/``poll``/``flush`` (the rollback reading this is itself inside a signal's handling)."""
        if self.background is not None and self.background.pending:
            self._deferred = self.flush()
        return self.last

    def poll(self) -> Signal | None:
        """Settle a background write that has already ended, without waiting for one still running."""
        if self.background is None or not self.background.pending or self.background.running:
            deferred, self._deferred = self._deferred, None
            return deferred
        return self.flush()

    def _settle(self, reason: str, pos: Position, result: Path | CheckpointPruneError | CheckpointWriteError,
                ) -> Signal | None:
        """What a write came to, on the loop's thread, the same for a synchronous and a background write."""
        if isinstance(result, CheckpointPruneError):
            # the new checkpoint is committed and verified; only removing old ones failed: disk use, not safety
            self.emit("tolaria", "checkpoint.prune_failed", "WARNING", path=str(result.checkpoint), error=str(result))
            result = result.checkpoint
        if isinstance(result, CheckpointWriteError):
            self.failures += 1
            self.emit("tolaria", "checkpoint.failed", "CRITICAL", reason=reason, error=str(result),
                      consecutive_failures=self.failures, kept=str(self.last))
            if self.failures >= self.max_failures and reason != "emergency":
                return Signal("HALT", "checkpoint_failures", f"{self.failures} checkpoint writes failed in a row", {})
            return Signal("NOTICE", "checkpoint_write_error", str(result), {})
        path = result
        self.failures = 0
        self.last = path
        if self._quarantine is not None and self._quarantine.exists():
            # kept as evidence for triage, out of keep_last's reach, once a verified successor exists
            target = self.root / "quarantine" / self._quarantine.name
            try:
                target.parent.mkdir(exist_ok=True)
                os.rename(self._quarantine, target)
            except OSError as exc:  # the corrupt copy stays where it is (never `latest` again): said, not fatal
                if is_disk_error(exc):
                    raise
                self.emit("tolaria", "checkpoint.quarantine_failed", "WARNING", path=str(self._quarantine),
                          error=exc.strerror or str(exc))
            else:
                self.emit("tolaria", "checkpoint.quarantined", "WARNING", path=str(target))
            self._quarantine = None
        self.written += 1
        self.emit("tolaria", "checkpoint.written", "INFO", path=str(path), reason=reason, epoch=pos.epochs_done,
                  step_in_epoch=pos.step_in_epoch, global_step=pos.global_step)
        self.faults.after_write(path)
        if self.cfg.keep_best and reason == "periodic" and not pos.step_in_epoch:
            return self._best(path, pos)
        return None

    def _best(self, path: Path, pos: Position) -> Signal | None:
        """Move ``best`` to the checkpoint of the epoch just written when its primary metric beats every earlier
        checkpointed epoch still in the history (ties keep the earlier one)."""
        key, direction = self.primary
        every = self.cfg.every_epochs
        rows = {r["epoch"]: r.get(key) for r in self.state.history if isinstance(r.get(key), int | float)}
        now = rows.get(pos.epochs_done)
        if now is None:
            return None
        earlier = [v for e, v in rows.items() if e < pos.epochs_done and e % every == 0]
        better = (lambda a, b: a > b) if direction == "max" else (lambda a, b: a < b)
        if earlier and not all(better(now, v) for v in earlier):
            return None
        try:
            write_pointer(self.root, BEST, path.name)
        except OSError as exc:
            if is_disk_error(exc):
                raise
            self.emit("tolaria", "checkpoint.failed", "CRITICAL", reason="best", error=str(exc), kept=str(self.last))
            return Signal("NOTICE", "checkpoint_write_error", f"moving '{BEST}' to {path.name} failed: {exc}", {})
        self.emit("tolaria", "checkpoint.best", "INFO", path=str(path), epoch=pos.epochs_done, metric=key, value=now)
        try:
            prune(self.root, self.cfg.keep_last, keep=path.name)  # the previous best, unprotected now
        except CheckpointPruneError as exc:
            self.emit("tolaria", "checkpoint.prune_failed", "WARNING", path=str(path), error=str(exc))
        return None

    def check_latest(self) -> Signal | None:
        """Re-verify the newest checkpoint before relying on it: bit rot is found while it can be rewritten.
        A corrupt one is quarantined after the next good write; the NOTICE comes back."""
        if self.last is None or not self.last.exists():
            return None
        report = verify_checkpoint(self.last)
        if report.ok:
            return None
        self.emit("tolaria", "checkpoint.corrupt_detected", "CRITICAL", path=str(self.last), problems=report.problems)
        self._quarantine = self.last
        return Signal("NOTICE", "checkpoint_corrupt", "; ".join(report.problems), {"path": str(self.last)})

    def _before_commit(self, tmp: Path) -> None:
        delay = self.cfg.commit_delay_ms / 1000.0
        if delay:
            time.sleep(delay)  # drills only: holds the write open so a signal or a kill can land inside it
        self.faults.before_commit(tmp)
