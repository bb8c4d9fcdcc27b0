"""P-1L's peer: the plain side's step as a ``LightningModule``, trained by a ``lightning.Trainer``.

Only imported once ``p1l.lightning_missing()`` found the optional ``lightning`` package (the ``bench`` extra).
Manual optimization: the TRAINING seed's own gradients are set by ``autograd.grad``, as Esper's seed pass sets
them, which automatic optimization cannot express. The ``Trainer`` runs on the CPU in barebones mode (no logger,
checkpointing, progress bar or model summary), so what is timed is its loop and hooks around the same step.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any

import lightning
import torch

from esper.app.bench.baseline import PlainLoop
from esper.app.bench.stats import BenchError
from esper.core.data import train_batches

VERSION: str = lightning.__version__


class PeerModule(lightning.LightningModule):
    """:meth:`PlainLoop.step` with Lightning's ``manual_backward`` and wrapped optimizer; one epoch is timed from
    its start hook to its end hook."""

    def __init__(self, loop: PlainLoop) -> None:
        super().__init__()
        self.loop = loop
        self.net = loop.net
        self.automatic_optimization = False
        self.steps = 0
        self.t0 = self.t1 = 0.0

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.loop.opt

    def on_train_epoch_start(self) -> None:
        self.t0 = time.perf_counter()

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.loop.step(x, y, backward=self.manual_backward, opt=self.optimizers())
        self.steps += 1

    def on_train_epoch_end(self) -> None:
        self.t1 = time.perf_counter()


def lightning_round(module: PeerModule, seed: int, first_epoch: int, epochs: int) -> float:
    """ms per step over ``epochs`` data epochs, each one ``Trainer.fit`` of a fresh Trainer (its set-up and
    teardown are not timed)."""
    loop = module.loop
    total_ms, steps = 0.0, 0
    log = logging.getLogger("lightning.pytorch")
    level = log.level
    log.setLevel(logging.WARNING)  # its "GPU available" lines are not the bench's output
    try:
        for e in range(epochs):
            data = train_batches(loop.task, loop.cfg.data, seed, first_epoch + e, 0, frozenset())
            trainer = lightning.Trainer(accelerator="cpu", devices=1, max_epochs=1, barebones=True,
                                        num_sanity_val_steps=0)
            module.steps = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # advice about DataLoader workers, not about the step
                trainer.fit(module, train_dataloaders=data)
            if module.steps == 0:
                raise BenchError("the Lightning Trainer ran no training step")
            total_ms += (module.t1 - module.t0) * 1000.0
            steps += module.steps
    finally:
        log.setLevel(level)
    return total_ms / steps
