"""Gradient accumulation (``trainer.accumulate_steps``), a Stateful part of every checkpoint.

Windows of ``k`` batches, aligned to the epoch's start, make one optimizer step each: every batch's loss is
divided by the number of batches its window takes, so the step sees the mean gradient (an epoch's last window may
be shorter, as in Lightning; a batch left out by the skip record shortens its window). A window never spans two
epochs, so the boundaries where the controller acts, rollback snapshots are taken and periodic checkpoints are
written hold no partial window. A stop inside one (SIGTERM, an emergency checkpoint) does: the window's gradients
so far, and the seeds' figures G2 will read at its end, are saved with the checkpoint, and a resume carries on
with them, bit for bit what an uninterrupted run would have done.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

import torch
from torch import nn

from esper.core.errors import CheckpointError

GRAD = "grad."  # the prefix of a pending gradient in the checkpoint's ``accumulation`` tensors


class Accumulation:
    """Where the run is inside an accumulation window: the batches taken, their gradients (in the parameters'
    ``.grad``) and the sums of the seeds' measured figures."""

    ABSENT = {"pending": 0, "measured": []}  # a checkpoint from before accumulation: never inside a window

    def __init__(self, steps: int, named: Callable[[], list[tuple[str, nn.Parameter]]]) -> None:
        self.steps = steps
        self._named = named
        self.pending = 0  # batches of the current window whose gradients are in ``.grad``
        self.measured: list[float] = []  # their seeds' losses and latencies, summed

    def window(self, index: int, steps_per_epoch: int, skipped: Collection[int]) -> tuple[int, bool]:
        """The number of batches the window of batch ``index`` takes, and whether ``index`` is its last."""
        start = index - index % self.steps
        taken = [i for i in range(start, min(start + self.steps, steps_per_epoch)) if i not in skipped]
        return len(taken), index == taken[-1]

    def add(self, measured: list[float]) -> None:
        """One batch's gradients are in; its seeds' figures join the window's."""
        if len(self.measured) != len(measured):  # the first batch (the training slots are fixed within an epoch)
            self.measured = [0.0] * len(measured)
        self.measured = [a + b for a, b in zip(self.measured, measured, strict=True)]
        self.pending += 1

    def close(self) -> list[float]:
        """The window's end: its seeds' figures as means over its batches (G2 sees one step per window)."""
        n = self.pending
        out = [v / n for v in self.measured] if n > 1 else list(self.measured)
        self.reset()
        return out

    def reset(self) -> None:
        """The window is done or dropped (a bad step zeroes its gradients)."""
        self.pending, self.measured = 0, []

    # ------------------------------------------------------------------------------------------ Stateful
    def tensors(self) -> dict[str, torch.Tensor]:
        if not self.pending:
            return {}
        return {GRAD + name: p.grad for name, p in self._named() if p.grad is not None}

    def state_dict(self) -> dict[str, Any]:
        return {"pending": self.pending, "measured": list(self.measured), **self.tensors()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pending, measured = state["pending"], state["measured"]
        grads = {k.removeprefix(GRAD): v for k, v in state.items() if k.startswith(GRAD)}
        if type(pending) is not int or not 0 <= pending < self.steps:
            raise CheckpointError(f"accumulation: {pending!r} batches pending does not fit a window of "
                                  f"{self.steps} (trainer.accumulate_steps)")
        if not isinstance(measured, list) or not all(type(v) is float and math.isfinite(v) for v in measured):
            raise CheckpointError("accumulation: 'measured' is not a list of finite numbers")
        if grads and not pending:
            raise CheckpointError("accumulation: gradients saved outside a window")
        live = dict(self._named())
        unknown = sorted(set(grads) - set(live))
        if unknown:
            raise CheckpointError(f"accumulation: gradients of parameters this run does not have: {unknown[:5]}")
        for name, grad in grads.items():  # every check before anything changes
            param = live[name]
            if not isinstance(grad, torch.Tensor) or grad.shape != param.shape or grad.dtype != param.dtype:
                raise CheckpointError(f"accumulation: the gradient of {name} does not fit the parameter "
                                      f"{param.dtype} {tuple(param.shape)}")
        for name, param in live.items():
            grad = grads.get(name)
            if grad is None:
                param.grad = None
            elif grad is not param.grad:  # the fast rollback hands back the live tensors: nothing to copy
                param.grad = grad.detach().to(param.device, copy=True)
        self.pending, self.measured = pending, list(measured)
