"""TrainState: where the run is (epoch, steps, global step), what it has done (the metrics history, the rollback
log, command counts) and the partial epoch's statistics. A Stateful part of every checkpoint and snapshot."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class EpochStats:
    """Aggregation of one epoch's steps: the loss and each task metric as sample-weighted sums of batch means."""

    loss_sum: float = 0.0
    metric_sums: dict[str, float] = field(default_factory=dict)
    seen: int = 0
    steps: int = 0
    skipped: int = 0
    step_ms: list[float] = field(default_factory=list)

    def add(self, loss: float, metrics: dict[str, float], n: int, ms: float) -> None:
        self.loss_sum += loss * n
        for name, value in metrics.items():
            self.metric_sums[name] = self.metric_sums.get(name, 0.0) + value * n
        self.seen += n
        self.steps += 1
        self.step_ms.append(ms)

    def means(self, metrics: Iterable[str]) -> dict[str, float | None]:
        """``train_loss`` and ``train_<metric>`` of the steps so far (None before the first)."""
        out: dict[str, float | None] = {"train_loss": self.loss_sum / self.seen if self.seen else None}
        for name in metrics:
            out[f"train_{name}"] = self.metric_sums[name] / self.seen if self.seen else None
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EpochStats:
        sums = dict(d["metric_sums"]) if "metric_sums" in d else {"accuracy": float(d["correct"])}  # pre-task format
        return cls(float(d["loss_sum"]), sums, int(d["seen"]), int(d["steps"]), int(d["skipped"]),
                   [float(v) for v in d["step_ms"]])

    @property
    def mean_step_ms(self) -> float:
        return sum(self.step_ms) / max(len(self.step_ms), 1)


@dataclass(frozen=True)
class Position:
    """Where in the run a state was taken: epochs completed and steps into the next epoch."""

    epochs_done: int
    step_in_epoch: int
    global_step: int


class TrainState:
    """The loop's own state. ``epoch`` is the epoch being trained (for records); the position is
    ``epochs_done`` + ``step_in_epoch`` + ``global_step``."""

    # what a rollback keeps from the live state rather than the snapshot: the record of the incident itself
    KEEP_ON_ROLLBACK = ("rollbacks", "commands")

    def __init__(self) -> None:
        self.epoch = 0
        self.epochs_done = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.history: list[dict[str, Any]] = []
        self.rollbacks: list[dict[str, Any]] = []
        self.commands: Counter[str] = Counter()
        self.stats: EpochStats | None = None  # the epoch in progress

    @property
    def position(self) -> Position:
        return Position(self.epochs_done, self.step_in_epoch, self.global_step)

    def start_epoch(self, epoch: int, skip: int) -> EpochStats:
        """Enter ``epoch`` at step ``skip``; a mid-epoch start keeps the restored partial statistics."""
        self.epoch = epoch
        self.step_in_epoch = skip
        if skip == 0 or self.stats is None:
            self.stats = EpochStats()
        return self.stats

    def end_epoch(self, row: dict[str, Any]) -> None:
        """The epoch is validated and recorded: the position moves to its end."""
        self.history.append(row)
        self.epochs_done = self.epoch
        self.step_in_epoch = 0
        self.stats = None

    # ---------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        """Its manifest keys (``epoch`` there means epochs completed)."""
        return {
            "epoch": self.epochs_done,
            "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step,
            "metrics": self.history[-1] if self.history else {},
            "history": list(self.history),
            "epoch_stats": asdict(self.stats) if self.stats is not None else None,
            "rollbacks": list(self.rollbacks),
            "commands": dict(self.commands),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epochs_done = int(state["epoch"])  # ``epoch`` (the one in progress) is the loop's to set
        self.step_in_epoch = int(state["step_in_epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        stats = state["epoch_stats"]
        self.stats = EpochStats.from_dict(stats) if stats is not None else None
        self.rollbacks = list(state["rollbacks"])
        self.commands = Counter(state["commands"])
