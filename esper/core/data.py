"""Tasks: the real digits data set, a synthetic task for fast tests, or a user factory."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from sklearn.datasets import load_digits

from esper.core import rng
from esper.core.config import EsperConfig
from esper.core.plugins import call_factory, check_type, load_factory


@dataclass(frozen=True)
class Dataset:
    """A classification task held in memory: float32 features, int64 labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    n_classes: int

    @property
    def n_features(self) -> int:
        return int(self.x_train.shape[1])


def build_dataset(cfg: EsperConfig) -> Dataset:
    """Build the configured task with a deterministic train/validation split."""
    task = cfg.data.task
    if task == "digits":
        bunch = load_digits()
        x = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.int64)
        return _split("digits", x, y, 10, cfg)
    if task == "synthetic":
        return _synthetic(cfg)
    factory = load_factory(task, "data.task")
    ds = check_type(call_factory(factory, task, "data.task", cfg), Dataset, task, "data.task")
    return ds


def _split(name: str, x: torch.Tensor, y: torch.Tensor, n_classes: int, cfg: EsperConfig) -> Dataset:
    gen = torch.Generator().manual_seed(cfg.run.seed)
    order = torch.randperm(len(x), generator=gen)
    n_val = max(1, int(round(len(x) * cfg.data.val_fraction)))
    val, train = order[:n_val], order[n_val:]
    return Dataset(name, x[train].contiguous(), y[train].contiguous(), x[val].contiguous(), y[val].contiguous(),
                   n_classes)


def _synthetic(cfg: EsperConfig) -> Dataset:
    """Labels from a random non-linear teacher, so extra capacity helps."""
    d = cfg.data
    gen = torch.Generator().manual_seed(rng.derive(cfg.run.seed, 7919))
    x = torch.randn(d.synthetic_samples, d.synthetic_features, generator=gen)
    w1 = torch.randn(d.synthetic_features, 32, generator=gen)
    w2 = torch.randn(32, d.synthetic_classes, generator=gen)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    return _split("synthetic", x, y, d.synthetic_classes, cfg)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume replays it exactly."""
    gen = torch.Generator().manual_seed(rng.derive(seed * 1_000_003, epoch))
    return torch.randperm(n, generator=gen)


def batches(ds: Dataset, batch_size: int, seed: int, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = epoch_order(len(ds.x_train), seed, epoch)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield ds.x_train[idx], ds.y_train[idx]


def steps_per_epoch(ds: Dataset, batch_size: int) -> int:
    return (len(ds.x_train) + batch_size - 1) // batch_size
