"""Tasks and how the loop reads them: the task protocol (``task``), the built-in tasks and user factories
(``builtin``), the resumable sampler, the DataLoaders and the skipped-batch record (``loader``)."""

from esper.core.data.builtin import build_task, check_task, mnist1d_arrays
from esper.core.data.loader import (
    BatchSkips,
    EpochBatches,
    SkippedBatch,
    epoch_order,
    steps_per_epoch,
    train_batches,
    val_batches,
)
from esper.core.data.task import (
    Direction,
    LossFn,
    MetricFn,
    Stacked,
    Task,
    TensorPairs,
    accuracy,
    classification,
    collate,
    cross_entropy,
    fetch,
)

__all__ = [
    "BatchSkips", "Direction", "EpochBatches", "LossFn", "MetricFn", "SkippedBatch", "Stacked", "Task",
    "TensorPairs", "accuracy", "build_task", "check_task", "classification", "collate", "cross_entropy",
    "epoch_order", "fetch", "mnist1d_arrays", "steps_per_epoch", "train_batches", "val_batches",
]
