"""An exponential moving average of the weights (``trainer.ema``), a Stateful part of every checkpoint.

After every optimizer step each trained parameter's average moves toward it: ``avg += (1 - d) * (w - avg)``,
with ``d = min(ema, (1 + n) / (10 + n))`` after ``n`` updates of that parameter when ``ema_warmup`` is on (the
TensorFlow ``ExponentialMovingAverage`` warm-up), so a seed germinated late starts its own average from its
initial weights instead of lagging behind a host that has trained for hours. A seed that is culled takes its
average with it. Buffers (BatchNorm's running statistics) are running averages already and are used as they are.

Every validation runs on the averaged weights (:meth:`WeightAverage.applied`), swapped in and back bit for bit, so
the epoch's figures, the gates' counterfactuals, keep-best and early stopping judge the weights that are exported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from esper.core.errors import CheckpointError


class WeightAverage:
    """The averages of the trained parameters by name, and how many updates each has had."""

    ABSENT = {"updates": {}}  # a checkpoint from before EMA (or from a run without it): averages start afresh

    def __init__(self, decay: float, warmup: bool, named: Callable[[], list[tuple[str, nn.Parameter]]]) -> None:
        self.decay = decay
        self.warmup = warmup
        self._named = named
        self.average: dict[str, torch.Tensor] = {}
        self.updates: dict[str, int] = {}

    def rate(self, name: str) -> float:
        n = self.updates[name]
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: every parameter's average moves toward it; a new parameter starts its own."""
        live = self._named()
        names = {name for name, _ in live}
        for gone in [n for n in self.average if n not in names]:
            del self.average[gone], self.updates[gone]
        for name, param in live:
            avg = self.average.get(name)
            if avg is None or avg.shape != param.shape:
                self.average[name] = param.detach().clone()
                self.updates[name] = 0
                continue
            avg.lerp_(param.detach(), 1.0 - self.rate(name))
            self.updates[name] += 1

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The averaged weights in the model for the duration; the trained weights back afterwards, exactly."""
        saved: list[tuple[nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for name, param in self._named():
                avg = self.average.get(name)
                if avg is not None:
                    saved.append((param, param.detach().clone()))
                    param.copy_(avg)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, weights in saved:
                    param.copy_(weights)

    # ------------------------------------------------------------------------------------------ Stateful
    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self.average)

    def state_dict(self) -> dict[str, Any]:
        return {"updates": dict(self.updates), **self.average}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        updates = state["updates"]
        tensors = {k: v for k, v in state.items() if k != "updates"}
        if not isinstance(updates, dict) or set(updates) != set(tensors):
            raise CheckpointError("ema: the update counts and the averaged tensors name different parameters")
        if not all(type(n) is int and 0 <= n < 2**62 for n in updates.values()):
            raise CheckpointError("ema: update counts must be non-negative integers")
        live = dict(self._named())
        average: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            param = live.get(name)
            if param is None:
                raise CheckpointError(f"ema: an average of {name}, a parameter this run does not have")
            if not isinstance(t, torch.Tensor) or t.shape != param.shape or t.dtype != param.dtype:
                raise CheckpointError(f"ema: the average of {name} does not fit the parameter "
                                      f"{param.dtype} {tuple(param.shape)}")
            own = self.average.get(name)
            if own is t:  # the fast rollback hands back the live tensors: nothing to copy
                average[name] = t
            elif own is not None and own.shape == t.shape:
                average[name] = own.copy_(t)
            else:
                average[name] = t.detach().to(param.device, copy=True)
        self.average, self.updates = average, dict(updates)
