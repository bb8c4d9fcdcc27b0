"""The task protocol (H-3): what Esper trains on, and how it is judged.

A :class:`Task` gives train and validation ``torch.utils.data.Dataset``\\ s of ``(x, y)`` pairs, the per-sample
input shape, the number of outputs, its loss and its metrics, one of which is primary (with the direction in
which it improves). The loss and every metric are means over a batch; an epoch's figure is their
sample-weighted mean. Metrics are reported as ``val_<name>`` (and ``train_<name>``); the loss as ``val_loss``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> scalar mean over the batch
MetricFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> scalar mean over the batch
Direction = Literal["max", "min"]


def cross_entropy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # computed on the output's device (Tolaria #22)
    return F.cross_entropy(output, target.to(output.device))


def accuracy(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Fraction of the batch whose largest logit is the target class."""
    return (output.detach().argmax(dim=1) == target.to(output.device)).float().mean()


@dataclass(frozen=True)
class Task:
    """One task. ``primary`` names a metric in ``metrics`` or is ``"loss"``."""

    name: str
    train: Dataset[Any]
    val: Dataset[Any]
    input_shape: tuple[int, ...]
    n_outputs: int
    loss: LossFn
    metrics: Mapping[str, MetricFn] = field(default_factory=dict)
    primary: str = "loss"
    direction: Direction = "min"

    @property
    def primary_metric(self) -> str:
        """The primary metric's reported name (``val_accuracy``, ``val_loss``, ...)."""
        return f"val_{self.primary}"

    def describe(self) -> dict[str, Any]:
        """What summary.json and the run.started event say about the task (contract C1)."""
        return {"name": self.name, "primary_metric": self.primary_metric, "direction": self.direction,
                "metrics": ["val_loss", *(f"val_{m}" for m in self.metrics)]}

    def example_x(self) -> torch.Tensor:
        """The first two training inputs, stacked: the batch the slot shape probe runs (contract C2)."""
        return fetch(self.train, range(min(2, len(self.train))))[0]  # type: ignore[arg-type]


def classification(name: str, train: Dataset[Any], val: Dataset[Any], input_shape: Sequence[int],
                   n_classes: int) -> Task:
    """A classification task: cross-entropy on logits ``[N, n_classes]``, accuracy as the primary metric."""
    return Task(name, train, val, tuple(input_shape), n_classes, cross_entropy, {"accuracy": accuracy},
                primary="accuracy", direction="max")


class Stacked:
    """A batch already gathered by a dataset's ``__getitems__``: :func:`collate` passes it through."""

    __slots__ = ("x", "y")

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y


class TensorPairs(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Inputs and targets held in memory. Gathers a whole batch with one indexing op (the DataLoader calls
    ``__getitems__``), so the built-in tasks cost what indexing the tensors cost before tasks were datasets."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if len(x) != len(y):
            raise ValueError(f"{len(x)} inputs but {len(y)} targets")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]

    def __getitems__(self, indices: Sequence[int]) -> Stacked:
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return Stacked(self.x[idx], self.y[idx])


def collate(data: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch as ``(x, y)`` tensors: a :class:`Stacked` batch as it is, a list of samples by torch's default."""
    if isinstance(data, Stacked):
        return data.x, data.y
    x, y = default_collate(data)
    return x, y


def fetch(ds: Dataset[Any], indices: Sequence[int] | range) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples at ``indices`` as one batch, gathered as a DataLoader would."""
    getitems = getattr(ds, "__getitems__", None)
    items = getitems(list(indices)) if callable(getitems) else [ds[i] for i in indices]
    return collate(items)
