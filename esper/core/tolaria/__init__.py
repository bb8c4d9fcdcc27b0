"""Tolaria, the training orchestrator: the loop and the trainer lifecycle, the optimizer and LR schedule,
validation, checkpoints, two-tier rollback, emergency handling, the mediator in front of the controller.

Facade convention (kasmina, tamiyo, tolaria alike): the package's ``__init__`` re-exports what other layers use;
code outside the package imports from here, modules inside import each other by module path. From outside, a
run is started with :func:`train` and driven step by step (the bench) through :func:`open_trainer`.
"""

from esper.core.tolaria.builder import Parts
from esper.core.tolaria.components import Components, Layout, ModuleState, Stateful
from esper.core.tolaria.emergency import LEVELS, EmergencyManager, Signal
from esper.core.tolaria.injector import FaultEntry, force_level
from esper.core.tolaria.mediator import ControllerWorker, Mediator
from esper.core.tolaria.optimizer import TorchOptimizerState
from esper.core.tolaria.records import Reporter
from esper.core.tolaria.rollback import FastSnapshot, live_tensors
from esper.core.tolaria.run import open_trainer, train
from esper.core.tolaria.train_state import EpochStats, Position, TrainState

__all__ = [
    "LEVELS", "Components", "ControllerWorker", "EmergencyManager", "EpochStats", "FastSnapshot", "FaultEntry",
    "Layout", "Mediator", "ModuleState", "Parts", "Position", "Reporter", "Signal", "Stateful",
    "TorchOptimizerState", "TrainState", "force_level", "live_tensors", "open_trainer", "train",
]
