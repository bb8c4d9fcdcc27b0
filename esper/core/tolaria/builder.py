"""Builds every part of a run from one config and hands them over together (TorchTitan's builders): nothing is
patched onto a part after it is made; each gets what it uses in its constructor.

The Stateful parts go into one :class:`Components` registry, in restore order, with the place each one's state
has in a checkpoint. To add one (a GradScaler, a resumable sampler): build it here and register it with a
manifest key of its own (as the fp16 GradScaler, ``precision``, does).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.core.config import EsperConfig
from esper.core.data import BatchSkips, Task, build_task, fetch, steps_per_epoch
from esper.core.dist import DataParallel
from esper.core.dist import current as current_world
from esper.core.kasmina import BlueprintLoadManager, BlueprintRegistry, Kasmina, param_count
from esper.core.model.device import resolve_device
from esper.core.model.host import build_host, check_output, probe_host
from esper.core.model.optim import LRSchedule
from esper.core.model.rng import RngState
from esper.core.records.rundir import RunDir
from esper.core.tamiyo import FieldReportLog, Tamiyo
from esper.core.tamiyo import worker as tamiyo_worker
from esper.core.tolaria.accumulate import Accumulation
from esper.core.tolaria.checkpointer import Checkpointer, RunConfigRecord
from esper.core.tolaria.components import Components, Layout, ModuleState
from esper.core.tolaria.compute import ComputeMeter
from esper.core.tolaria.decisions import Decisions
from esper.core.tolaria.ema import WeightAverage
from esper.core.tolaria.emergency import EmergencyManager, Signal
from esper.core.tolaria.injector import FaultEntry, FaultInjector
from esper.core.tolaria.mediator import Mediator, open_controller
from esper.core.tolaria.optimizer import OptimizerPart
from esper.core.tolaria.precision import Precision
from esper.core.tolaria.profiler import ProfilerWindow
from esper.core.tolaria.ranks import RankMediator, open_mediator
from esper.core.tolaria.rollback import RollbackManager
from esper.core.tolaria.safety import Safety
from esper.core.tolaria.train_state import TrainState
from esper.statemachines import StrictMachine

ControllerFactory = Callable[[EsperConfig, str], Tamiyo]


def controller_factory(cfg: EsperConfig, run_id: str) -> Tamiyo:
    """The run's controller, built once from the resolved config (Tamiyo #16)."""
    return Tamiyo(cfg.controller, cfg.seeds, run_id)


@dataclass
class Parts:
    """Everything one run is made of."""

    device: torch.device
    task: Task
    host: nn.Module
    kasmina: Kasmina
    loader: BlueprintLoadManager | None
    optimizer: OptimizerPart
    schedule: LRSchedule
    emergency: EmergencyManager
    controller: Tamiyo | None
    mediator: Mediator | RankMediator | None
    state: TrainState
    skips: BatchSkips
    rng: RngState
    components: Components
    faults: FaultInjector
    checkpointer: Checkpointer
    rollback: RollbackManager
    safety: Safety
    decisions: Decisions | None
    profiler: ProfilerWindow
    probe: tuple[torch.Tensor, torch.Tensor]
    steps_per_epoch: int
    pin_memory: bool  # data.pin_memory, on a CUDA device
    precision: Precision
    parallel: DataParallel  # the reductions and cross-rank checks under torchrun (no-ops in a world of one)
    compute: ComputeMeter  # FLOPs and training seconds so far
    accumulation: Accumulation  # the gradient-accumulation window in progress
    ema: WeightAverage | None  # the weights' moving average (trainer.ema), used by every validation

    def close(self) -> None:
        """Stop the controller worker and the blueprint prefetcher, and let a background checkpoint write end (its
        outcome is settled by the loop; on an abnormal end it is committed or left as a temp dir): nothing of the
        run outlives it."""
        if self.checkpointer.background is not None:
            self.checkpointer.background.wait()
        if self.mediator is not None:
            self.mediator.close()
        if self.loader is not None:
            self.loader.shutdown(timeout_s=2.0)


def stored_params(kasmina: Kasmina) -> list[tuple[str, nn.Parameter]]:
    """Every trained parameter under its name in the checkpoint's ``model`` tensors (``host.<name>``,
    ``seed.<slot>.<name>``): the names the accumulated gradients and the weights' averages are stored under."""
    named = [(f"host.{n}", p) for n, p in kasmina.host.named_parameters()]
    for s in kasmina.slots.values():
        if s.module is not None:
            named.extend((f"seed.{s.name}.{n}", p) for n, p in s.module.named_parameters())
    return named


def build_parts(cfg: EsperConfig, run_dir: RunDir, machine: StrictMachine, emit: Callable[..., Any], *,
                task: Task | None = None, controller: ControllerFactory | None = controller_factory,
                faults: Sequence[FaultEntry] = ()) -> Parts:
    """Every part of the run, wired. ``task``: already built (else built here); ``controller=None`` runs without
    one (emergency tests); ``faults`` are injected besides the config's (a drill's forced level)."""
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.use_deterministic_algorithms(True)
    device = resolve_device(cfg.run.device)
    task = task if task is not None else build_task(cfg)
    host = build_host(cfg, task.input_shape, task.n_outputs).to(device)
    # a relative seeds.param_budget ("5%") becomes a count here, once, before any part reads it
    resolved = {"param_budget": cfg.seeds.budget_for(param_count(host))}
    seeds_cfg = cfg.seeds.model_copy(update=resolved if cfg.seeds.enabled else {**resolved, "slots": []})
    host_probe = probe_host(host, [s.layer for s in seeds_cfg.slots], task.example_x().to(device), cfg.host.output)
    check_output(host_probe, task.n_outputs)
    # and a percentage of trainer.epochs in controller.grow_at_epoch becomes an epoch
    ccfg = cfg.controller.model_copy(update={"grow_at_epoch": cfg.controller.grow_epochs(cfg.trainer.epochs)})
    kcfg = cfg.model_copy(update={"seeds": seeds_cfg, "controller": ccfg})
    registry = BlueprintRegistry(kcfg.seeds)
    loader = None
    if seeds_cfg.slots:
        loader = BlueprintLoadManager(
            lambda name, shape: registry.build(name, shape, cfg.run.seed), cache_bytes=cfg.seeds.cache_bytes,
            workers=cfg.seeds.prefetch_workers, timeout_ms=cfg.seeds.load_timeout_ms, compile=cfg.seeds.compile,
            compile_timeout_ms=cfg.seeds.compile_timeout_ms,
            emit=emit)
    mediator: Mediator | RankMediator | None = None
    try:
        kasmina = Kasmina(seeds_cfg, host, host_probe, emit, run_seed=cfg.run.seed, output=cfg.host.output,
                          fossilize_min_improvement=cfg.controller.fossilize_min_improvement, registry=registry,
                          build=loader.get if loader else None)
        if loader is not None:
            # the controller may germinate any compatible blueprint in any slot: prefetch them all now
            for name, shape in kasmina.prefetch_keys():
                loader.prefetch(name, shape)
        optimizer = OptimizerPart(cfg.trainer, kasmina, emit)
        n_steps = steps_per_epoch(len(task.train), cfg.data.batch_size, cfg.data.drop_last)  # type: ignore[arg-type]
        optimizer_steps = -(-n_steps // cfg.trainer.accumulate_steps)  # an epoch's last window may be shorter
        schedule = LRSchedule(cfg.trainer, cfg.trainer.epochs * optimizer_steps)
        accumulation = Accumulation(cfg.trainer.accumulate_steps, lambda: stored_params(kasmina))
        ema = (WeightAverage(cfg.trainer.ema, cfg.trainer.ema_warmup, lambda: stored_params(kasmina))
               if cfg.trainer.ema else None)
        emergency = EmergencyManager(cfg.emergency, emit)
        tamiyo = None
        if controller is not None and seeds_cfg.slots:
            tamiyo = controller(kcfg, run_dir.run_id)
            mediator = open_mediator(lambda: Mediator(cfg.controller.timeout_ms, emit, controller=open_controller(
                cfg.controller.isolation, tamiyo_worker.FACTORY,
                tamiyo_worker.factory_args(kcfg.controller, kcfg.seeds, run_dir.run_id),
                start_timeout_ms=cfg.controller.start_timeout_ms)))
        state = TrainState()
        skips = BatchSkips()
        rng = RngState()
        compute = ComputeMeter(world_size=current_world().size)
        precision = Precision(cfg.run.precision, device, emit, max_overflow_steps=cfg.emergency.max_overflow_steps)

        components = Components()  # restore order: the modules before the optimizer that holds their parameters
        components.register("host", ModuleState(host, "host"), Layout(file="model", prefix="host."))
        components.register("kasmina", kasmina, Layout(file="model", prefix="seed.", keys=("seeds",)))
        components.register("optimizer", optimizer, Layout(file="optimizer", key="optimizer"))
        # after the modules and the optimizer: their parameters are the ones these two name
        components.register("accumulation", accumulation,
                            Layout(file="accumulation", key="accumulation", absent=Accumulation.ABSENT))
        components.register("ema", ema, Layout(file="ema", key="ema", absent=WeightAverage.ABSENT))
        components.register("schedule", schedule, Layout())
        components.register("train", state, Layout(keys=tuple(state.state_dict())),  # its keys, stated once there
                            keep_on_rollback=TrainState.KEEP_ON_ROLLBACK)
        # what the run has cost: a rollback keeps it (the undone steps' compute was spent)
        components.register("compute", compute, Layout(key="compute", absent=ComputeMeter.ABSENT),
                            keep_on_rollback=True)
        components.register("data", skips, Layout(key="data", absent=BatchSkips.ABSENT), keep_on_rollback=True)
        components.register("emergency", emergency, Layout(key="emergency"), keep_on_rollback=True)
        components.register("controller", tamiyo, Layout(key="controller"), keep_on_rollback=True)  # rewound instead
        components.register("rng", rng, Layout(file="rng"))
        # the loss scale is numerics, not a result: a rollback keeps it (and the count of overflowed steps)
        components.register("precision", precision, Layout(key="precision", absent=Precision.ABSENT),
                            keep_on_rollback=True)

        injector = FaultInjector([*(FaultEntry.of(f) for f in cfg.faults), *faults], cfg.emergency, emit)
        checkpointer = Checkpointer(cfg.checkpoint, run_dir.checkpoints, run_dir.run_id, components, state, machine,
                                    injector, emit, config=RunConfigRecord.of(cfg),
                                    max_failures=cfg.emergency.max_checkpoint_failures,
                                    primary=(task.primary_metric, task.direction))
        rollback = RollbackManager(cfg.rollback, components, state, tamiyo, checkpointer.committed, emit)
        safety = Safety(cfg.emergency, machine, emergency, rollback, checkpointer, state, skips, kasmina, optimizer,
                        emit)
        px, py = fetch(task.train, range(min(len(task.train), cfg.data.batch_size)))  # type: ignore[arg-type]
        probe = (px.to(device), py.to(device))  # G1's probe batch: the first training samples
        decisions = None
        if tamiyo is not None and mediator is not None:
            decisions = Decisions(run_dir.run_id, tamiyo, mediator, kasmina, optimizer, state,
                                  FieldReportLog(run_dir.field_reports), injector, probe, task, safety.handle,
                                  emit)
        profiler = ProfilerWindow(cfg.trainer.profiler, run_dir.path, emit)
        def diverged(cause: str, detail: str, attrs: dict[str, Any]) -> None:
            emit("tolaria", "rank.divergence", "CRITICAL", detail=detail, **attrs)  # names the ranks
            safety.handle(Signal("HALT", cause, detail, attrs))
        parallel = DataParallel(diverged, emit=emit)
    except BaseException:
        # nothing of a run that failed to build outlives it (prefetch threads, the controller worker)
        if loader is not None:
            loader.shutdown(timeout_s=2.0)
        if mediator is not None:
            mediator.close()
        raise
    return Parts(device, task, host, kasmina, loader, optimizer, schedule, emergency, tamiyo, mediator, state, skips,
                 rng, components, injector, checkpointer, rollback, safety, decisions, profiler, probe, n_steps,
                 cfg.data.pin_memory and device.type == "cuda", precision, parallel, compute, accumulation, ema)
