"""Gradient accumulation (``trainer.accumulate_steps``), a Stateful part of every checkpoint.

Windows of ``k`` batches, aligned to the epoch's start, make one optimizer step each: every batch's gradients (as
reduced over the ranks) are added into the window's sums, and the window's end hands the optimizer their mean,
the sums divided by the batches taken (an epoch's last window may be shorter, as in Lightning; a batch left out by
the skip record, or dropped with a bad step's window, is not counted). Dividing at the end, not each batch's loss
by a size fixed in advance, keeps a window's arithmetic the same however it is reached: straight, or resumed
inside it and then shortened by a rollback.

A window never spans two epochs, so the boundaries where the controller acts, rollback snapshots are taken and
periodic checkpoints are written hold no partial window. A stop inside one (SIGTERM, an emergency checkpoint) does:
the window's sums and the seeds' summed figures are saved with the checkpoint, the same on every rank, and a
resume carries on with them, bit for bit what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from esper.core.errors import CheckpointError

GRAD = "grad."  # the prefix of a window's gradient sum in the checkpoint's ``accumulation`` tensors


class Accumulation:
    """The window in progress: the batches taken, their gradient sums by parameter and their seeds' figures."""

    ABSENT = {"pending": 0, "window": 0, "measured": []}  # a checkpoint from before accumulation: no window open

    def __init__(self, steps: int, named: Callable[[], list[tuple[str, nn.Parameter]]]) -> None:
        self.steps = steps
        self._named = named
        self.pending = 0  # batches of the current window in ``sums``
        self.start = 0  # that window's first batch index in its epoch
        self.sums: dict[str, torch.Tensor] = {}
        self.measured: list[float] = []  # their seeds' losses and latencies, summed

    def window(self, index: int, steps_per_epoch: int, skipped: Collection[int]) -> tuple[int, bool]:
        """The number of batches the window of batch ``index`` takes, and whether ``index`` is its last."""
        start = index - index % self.steps
        taken = [i for i in range(start, min(start + self.steps, steps_per_epoch)) if i not in skipped]
        return len(taken), index == taken[-1]

    def left_open(self, index: int | None) -> bool:
        """Whether a window holds batches but can no longer reach its last one: batch ``index`` is in a later
        window (``None``: the epoch has ended). A run resumed inside a window whose remaining batches a rollback
        then leaves out reaches this; the straight run stepped at the window's last batch taken, so it steps now."""
        return self.pending > 0 and (index is None or index - index % self.steps != self.start)

    @torch.no_grad()
    def add(self, index: int, measured: list[float]) -> None:
        """Batch ``index``'s gradients (in ``.grad``) and its seeds' figures join the window's sums."""
        if not self.pending:
            self.start = index - index % self.steps
        for name, param in self._named():
            if param.grad is None:
                continue
            total = self.sums.get(name)
            if total is None:
                self.sums[name] = param.grad.detach().clone()
            else:
                total.add_(param.grad)
        if len(self.measured) != len(measured):  # the first batch (the training slots are fixed within an epoch)
            self.measured = [0.0] * len(measured)
        self.measured = [a + b for a, b in zip(self.measured, measured, strict=True)]
        self.pending += 1

    @torch.no_grad()
    def close(self) -> list[float]:
        """The window's end: each parameter's ``.grad`` is the mean of its batches' gradients; returns the seeds'
        figures as means too (G2 sees one step per window)."""
        n = self.pending
        for name, param in self._named():
            total = self.sums.get(name)
            param.grad = total.div_(n) if total is not None else None
        out = [v / n for v in self.measured]
        self.reset()
        return out

    def reset(self) -> None:
        """The window is done or dropped (a bad step's)."""
        self.pending, self.sums, self.measured = 0, {}, []

    # ------------------------------------------------------------------------------------------ Stateful
    def tensors(self) -> dict[str, torch.Tensor]:
        return {GRAD + name: t for name, t in self.sums.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "window": self.start, "measured": list(self.measured), **self.tensors()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending, start, measured = state["pending"], state["window"], state["measured"]
        sums = {k.removeprefix(GRAD): v for k, v in state.items() if k.startswith(GRAD)}
        if type(pending) is not int or not 0 <= pending < self.steps:
            raise CheckpointError(f"accumulation: {pending!r} batches pending does not fit a window of "
                                  f"{self.steps} (trainer.accumulate_steps)")
        if type(start) is not int or start < 0 or start % self.steps:
            raise CheckpointError(f"accumulation: window {start!r} is not the first batch of a window of {self.steps}")
        if not isinstance(measured, list) or not all(type(v) is float and math.isfinite(v) for v in measured):
            raise CheckpointError("accumulation: 'measured' is not a list of finite numbers")
        if sums and not pending:
            raise CheckpointError("accumulation: gradients saved outside a window")
        live = dict(self._named())
        unknown = sorted(set(sums) - set(live))
        if unknown:
            raise CheckpointError(f"accumulation: gradients of parameters this run does not have: {unknown[:5]}")
        for name, total in sums.items():  # every check before anything changes
            param = live[name]
            if not isinstance(total, torch.Tensor) or total.shape != param.shape or total.dtype != param.dtype:
                raise CheckpointError(f"accumulation: the gradient of {name} does not fit the parameter "
                                      f"{param.dtype} {tuple(param.shape)}")
        # copied, never kept (the fast rollback hands back the live sums themselves: nothing to copy then)
        self.sums = {name: t if self.sums.get(name) is t else t.detach().to(live[name].device, copy=True)
                     for name, t in sums.items()}
        self.pending, self.start, self.measured = pending, start, list(measured)
