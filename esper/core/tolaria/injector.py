"""Drill faults (SPEC E-1) act through hooks that the loop and the checkpointer call at fixed points; neither
ever names a fault. Each fault acts through the real code path: a real NaN in the loss, a real +inf gradient,
a real OSError at commit, a real SIGTERM to the process.

At its ``EPOCH:STEP`` a fault is armed (and announced: ``fault.injected``). A fault of a step hook acts in that
step or not at all; the others act at the next place they can (a decision, a checkpoint write). A forced level
is one more entry (:func:`force_level`: never a config key, so a resumed drill does not force it again),
acting in ``before_step``.

Hooks, in the order a step meets them: ``before_batch`` (reading the batch), ``before_step`` (inside the step's
timed region), ``corrupt_loss``, ``after_backward``; then ``controller`` (a decision's payload), and the
checkpointer's ``before_commit`` and ``after_write``.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from esper.core.config import EmergencyConfig, FaultConfig
from esper.core.config.faults import CATALOGUE, CRASHED_RANK, MULTI_RANK, parse_at
from esper.core.dist import current, restart_count
from esper.core.errors import EsperError
from esper.core.kasmina import LIVE, Kasmina
from esper.core.tolaria.emergency import Signal

FORCE_LEVEL = "force_level"  # not in the catalogue: drills force a level with it

# the hook each fault acts in
HOOK: dict[str, str] = {
    "dataloader_error": "before_batch",
    "sigterm": "before_step", "slow_step": "before_step", "seed_forward_error": "before_step",
    "rank_crash": "before_step",
    FORCE_LEVEL: "before_step",
    "nan_loss": "corrupt_loss", "loss_spike": "corrupt_loss",
    "inf_grad": "after_backward",
    "controller_timeout": "controller", "controller_crash": "controller", "illegal_command": "controller",
    "checkpoint_write_error": "before_commit",
    "checkpoint_corrupt": "after_write",
}
STEP_HOOKS = frozenset({"before_batch", "before_step", "corrupt_loss", "after_backward"})
# what a controller fault makes the worker do with the decision (esper.core.tamiyo.worker.INJECTIONS)
_CONTROLLER = {"controller_timeout": "hang", "controller_crash": "crash", "illegal_command": "illegal_command"}
if set(HOOK) != set(CATALOGUE) | {FORCE_LEVEL}:  # checked at import: every catalogue fault has a hook
    raise RuntimeError(f"faults without a hook: {set(HOOK) ^ (set(CATALOGUE) | {FORCE_LEVEL})}")


class DataLoaderError(EsperError):
    """The training data could not be read."""


@dataclass(frozen=True)
class FaultEntry:
    """One fault to inject at ``at`` (``EPOCH[:STEP]``): a catalogue fault, or a forced ``level``."""

    name: str
    at: str
    level: str = ""

    @classmethod
    def of(cls, fault: FaultConfig) -> FaultEntry:
        return cls(fault.name, fault.at)


def force_level(level: str, at: str) -> FaultEntry:
    """The entry that forces ``level`` (NOTICE..HALT) at ``at``."""
    return FaultEntry(FORCE_LEVEL, at, level.upper())


class FaultInjector:
    """Arms each configured fault once at its point; the hooks consume the armed faults they serve."""

    def __init__(self, faults: Sequence[FaultEntry], cfg: EmergencyConfig, emit: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.emit = emit
        # a restarted group runs the same faults again: one that crashed a rank acts on the first attempt only
        self.pending: list[tuple[tuple[int, int], FaultEntry]] = [
            (parse_at(f.at), f) for f in faults if not (f.name in MULTI_RANK and restart_count())]
        self.armed: dict[str, FaultEntry] = {}
        self.fired: list[dict[str, Any]] = []

    def arm(self, epoch: int, step: int, global_step: int) -> None:
        """A step begins: faults due now are armed; step faults the last step did not take lapse."""
        self.armed = {n: f for n, f in self.armed.items() if HOOK[n] not in STEP_HOOKS}
        due = {f.name: f for at, f in self.pending if at == (epoch, step)}
        if not due:
            return
        self.pending = [(at, f) for at, f in self.pending if at != (epoch, step)]
        for name in sorted(due):
            record: dict[str, Any] = {"fault": name, "epoch": epoch, "step": step, "global_step": global_step}
            if name == FORCE_LEVEL:
                record["forced_level"] = due[name].level
            self.fired.append(record)
            # a fault that kills a rank is on disk (CRITICAL) before it acts
            self.emit("tolaria", "fault.injected", "CRITICAL" if name in MULTI_RANK else "WARNING", **record)
        self.armed.update(due)

    def _take(self, hook: str) -> dict[str, FaultEntry]:
        taken = {n: f for n, f in self.armed.items() if HOOK[n] == hook}
        for name in taken:
            del self.armed[name]
        return taken

    # ------------------------------------------------------------------------------------------- the step
    def before_batch(self, epoch: int, index: int) -> None:
        """Reading the step's batch: a data fault raises as a failing loader would."""
        if self._take("before_batch"):
            raise DataLoaderError(f"injected fault: reading batch {index} of epoch {epoch} failed")

    def before_step(self, kasmina: Kasmina) -> Signal | None:
        """Inside the step's timed region, before the forward: signals, delays, a seed's failing forward; a
        forced level is returned as the signal the step hands to safety."""
        taken = self._take("before_step")
        if "sigterm" in taken:
            os.kill(os.getpid(), signal.SIGTERM)
        if "rank_crash" in taken:
            self._rank_crash()
        if "slow_step" in taken:
            time.sleep(self.cfg.slow_step_ms * 1.5 / 1000.0)
        if "seed_forward_error" in taken:
            live = [s for s in kasmina.slots.values() if s.module is not None and s.stage in LIVE]
            if live:
                live[0].fail_forward = RuntimeError("injected fault: seed_forward_error")
            else:
                self.emit("tolaria", "fault.not_applicable", "WARNING", fault="seed_forward_error",
                          reason="no live seed to fail")
        forced = taken.get(FORCE_LEVEL)
        if forced is None:
            return None
        return Signal(forced.level, "forced", f"drill forced level {forced.level}", {})

    def _rank_crash(self) -> None:
        """SIGKILL rank 1, as the OOM killer or a lost node would: no handler, no checkpoint, no last event. A
        restarted group never arms it (``__init__``), so the same command line completes the second time."""
        world = current()
        if not world.active:
            self.emit("tolaria", "fault.not_applicable", "WARNING", fault="rank_crash",
                      reason="a world of one rank: rank_crash needs esper train --nproc 2 or more")
        elif world.rank == CRASHED_RANK:
            os.kill(os.getpid(), signal.SIGKILL)

    def corrupt_loss(self, loss: torch.Tensor) -> torch.Tensor:
        taken = self._take("corrupt_loss")
        if "nan_loss" in taken:
            loss = loss * float("nan")
        if "loss_spike" in taken:
            loss = loss * (self.cfg.loss_explosion_factor * 100.0)
        return loss

    def after_backward(self, params: Iterable[nn.Parameter]) -> None:
        if self._take("after_backward"):
            first = next(p for p in params if p.grad is not None)
            first.grad.view(-1)[0] = float("inf")  # type: ignore[union-attr]

    # ------------------------------------------------------------------------- decisions and checkpoints
    def controller(self) -> str | None:
        """What the next decision's worker is told to do instead of deciding (None: decide)."""
        taken = self._take("controller")
        injection = None
        for name in _CONTROLLER:  # several at once: the last of this order wins
            if name in taken:
                injection = _CONTROLLER[name]
        return injection

    def before_commit(self, tmp: Path) -> None:
        """After every file of a checkpoint is written and fsynced, before the rename that commits it."""
        if self._take("before_commit"):
            raise OSError(28, "No space left on device (injected fault: checkpoint_write_error)")

    def after_write(self, path: Path) -> None:
        """After a checkpoint is committed and verified: bit rot for the next verification to find."""
        if self._take("after_write"):
            _flip_byte(path / "model.safetensors")
            self.emit("tolaria", "fault.acted", "WARNING", fault="checkpoint_corrupt", path=str(path))


def _flip_byte(path: Path) -> None:
    """Corrupt one byte in the middle of a file, in place."""
    with open(path, "r+b") as fh:
        fh.seek(0, os.SEEK_END)
        middle = fh.tell() // 2
        fh.seek(middle)
        byte = fh.read(1)
        fh.seek(middle)
        fh.write(bytes([byte[0] ^ 0xFF]))
        fh.flush()
        os.fsync(fh.fileno())
