"""The run's numeric precision as one Stateful part (``run.precision``): autocast for the forward passes and,
for fp16, a ``torch.amp.GradScaler`` whose state is checkpointed and restored.

fp16 gradients can overflow while the loss is fine: the scaler then skips the optimizer step and halves its
scale. Such a step is counted (``overflow_steps``) and reported (``step.overflow``), not an emergency, until
``emergency.max_overflow_steps`` of them come in a row: then the gradient is non-finite whatever the scale (a
bug, not a range problem) and the step is ELEVATED, so the run rolls back and escalates loudly instead of
skipping every step with an ever smaller scale. A non-finite *loss* is always an emergency (the emergency
manager checks it before any scaling). bf16 has fp32's range: no scaler. Gradients are unscaled before the
emergency manager's gradient check and before clipping, so both see true gradients.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from esper.core.errors import CheckpointError
from esper.core.model.device import DTYPES
from esper.core.tolaria.emergency import Signal

_NO_AUTOCAST = contextlib.nullcontext()  # reusable and reentrant

class Precision:
    """Autocast dtype (``None`` for fp32) and the fp16 loss scaler."""

    ABSENT: dict[str, Any] = {"scaler": None, "overflow_steps": 0}  # a checkpoint from before precision existed

    def __init__(self, precision: str, device: torch.device, emit: Callable[..., Any], *,
                 max_overflow_steps: int) -> None:
        self.mode = precision
        self.device = device
        self.dtype = DTYPES[precision]
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
        self.overflow_steps = 0
        self.in_a_row = 0  # overflow-skipped steps since the last applied one (not checkpointed: a resume restarts it)
        self.max_in_a_row = max_overflow_steps
        self._emit = emit

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast to the run's dtype; fp32: a no-op context (entered twice a step: no generator to run)."""
        if self.dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.dtype)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to differentiate (scaled for fp16)."""
        return loss if self.scaler is None else self.scaler.scale(loss)

    def unscale(self, optimizer: torch.optim.Optimizer) -> bool:
        """Unscale the gradients in place; True when they overflowed (fp16 only: the step will be skipped)."""
        if self.scaler is None:
            return False
        self.scaler.unscale_(optimizer)
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        return bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def step(self, optimizer: torch.optim.Optimizer, overflowed: bool, global_step: int) -> Signal | None:
        """The optimizer step (the scaler's, which skips it on overflow) and the scale update; an ELEVATED signal
        when too many steps in a row overflowed."""
        if self.scaler is None:
            optimizer.step()
            return None
        scale = self.scaler.get_scale()
        self.scaler.step(optimizer)
        self.scaler.update()
        if not overflowed:
            self.in_a_row = 0
            return None
        self.overflow_steps += 1
        self.in_a_row += 1
        self._emit("tolaria", "step.overflow", "WARNING", global_step=global_step, scale=scale,
                   new_scale=self.scaler.get_scale(), overflow_steps=self.overflow_steps, in_a_row=self.in_a_row,
                   reason="fp16 gradients overflowed: the scaler skipped the step and lowered its scale")
        if self.in_a_row < self.max_in_a_row:
            return None
        in_a_row, self.in_a_row = self.in_a_row, 0
        return Signal("ELEVATED", "non_finite_gradient",
                      f"fp16 gradients overflowed {in_a_row} steps in a row (emergency.max_overflow_steps); the loss "
                      f"scale is down to {self.scaler.get_scale():.3g}", {"parameter": None, "in_a_row": in_a_row})

    def describe(self) -> dict[str, Any]:
        """What summary.json says about the run's precision."""
        out: dict[str, Any] = {"mode": self.mode, "overflow_steps": self.overflow_steps}
        if self.scaler is not None:
            out["scale"] = self.scaler.get_scale()
        return out

    # Stateful
    def state_dict(self) -> dict[str, Any]:
        return {"scaler": None if self.scaler is None else dict(self.scaler.state_dict()),
                "overflow_steps": self.overflow_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved, steps = state.get("scaler"), state.get("overflow_steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise CheckpointError(f"checkpoint precision.overflow_steps is {steps!r}, expected an int >= 0")
        if self.scaler is not None and saved is not None:
            if not isinstance(saved, dict) or not all(isinstance(saved.get(k), int | float) and
                                                      math.isfinite(saved[k]) and saved[k] >= 0
                                                      for k in ("scale", "growth_factor", "backoff_factor",
                                                                "growth_interval", "_growth_tracker")):
                raise CheckpointError(f"checkpoint precision.scaler is {saved!r}, expected a GradScaler state "
                                      "with finite, non-negative numbers")
            self.scaler.load_state_dict(saved)
        self.overflow_steps = steps
