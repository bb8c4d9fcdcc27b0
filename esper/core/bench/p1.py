"""P-1: Esper's train step against a plain PyTorch loop on the same model, data and seeds, and the controller on
its cadence. Esper's side is a real built trainer driven through its public methods only: seeds reach
BLENDING and TRAINING through the real gates, and every timed step is ``train_step``."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from esper.core.bench.baseline import PlainNet, epoch_batches, p1_round
from esper.core.bench.stats import (
    Absolute,
    BenchError,
    BenchPlan,
    BenchUnsupported,
    Comparison,
    alternate,
    gc_paused,
    summarize,
)
from esper.core.config import EsperConfig
from esper.core.host import MLPHost, build_host
from esper.core.kasmina import SeedSlot
from esper.core.optim import ParamGroupSpec, build_optimizer
from esper.core.rundir import RunDir
from esper.core.telemetry import Emitter
from esper.core.tolaria import EpochStats, Parts, open_trainer

Step = Callable[[torch.Tensor, torch.Tensor, EpochStats, list[SeedSlot] | None], bool]


@dataclass
class P1Setup:
    """A built trainer, as the bench drives it (its public methods), and the plain side."""

    cfg: EsperConfig
    parts: Parts
    step: Step  # Trainer.train_step
    evaluate: Callable[[frozenset[str]], dict[str, float]]
    emitter: Emitter
    close: Callable[[], None]
    plain: PlainNet
    plain_opt: torch.optim.Optimizer
    blend_steps: int
    blend_slot: str
    train_slot: str
    epoch: int = 1000  # data epochs used for timing (disjoint from the set-up epochs)


def _germinate(p: Parts, slot: str, blueprint: str) -> None:
    """Germinate through G0 and start training through G1, as the trainer applies a command."""
    assert p.decisions is not None  # setup_p1 checked there is a controller
    result = p.decisions.germinate(slot, blueprint, "bench: germinate")
    if not result.passed:
        raise BenchError(f"bench set-up: G1 failed for {blueprint} in {slot}: {result.reason}")


def _train_epoch(cfg: EsperConfig, p: Parts, step: Step, emitter: Emitter, epoch: int) -> EpochStats:
    stats = EpochStats()
    training = [sl for sl in p.kasmina.slots.values() if sl.stage == "TRAINING"]
    for x, y in epoch_batches(p.task, cfg, epoch):
        emitter.set_context(epoch=epoch, step=p.state.global_step)
        step(x, y, stats, training)
    return stats


def setup_p1(cfg: EsperConfig, scratch: Path) -> P1Setup:
    """A built trainer with one seed BLENDING and one TRAINING, reached through the real gates."""
    if not cfg.seeds.enabled or len(cfg.seeds.slots) < 2:
        raise BenchUnsupported("P-1 needs seeds.enabled = true and at least two seeds.slots", key="seeds.enabled")
    if cfg.host.factory != "mlp":
        raise BenchUnsupported("P-1's plain baseline is written for the built-in MLP host (host.factory = 'mlp')")
    path = scratch / "p1-run"
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    tr = open_trainer(cfg, RunDir(path, "bench"), emitter=Emitter(None, "bench", cfg.telemetry))
    p = tr.parts
    try:
        blend_slot, train_slot = cfg.seeds.slots[0].name, cfg.seeds.slots[1].name
        blueprints = cfg.seeds.blueprints
        _germinate(p, blend_slot, blueprints[0])
        slot = p.kasmina.slots[blend_slot]
        epoch = 0
        while slot.stage == "TRAINING" and epoch < cfg.seeds.min_training_epochs + 3:
            epoch += 1
            _train_epoch(cfg, p, tr.train_step, tr.emitter, epoch)
            if p.kasmina.end_epoch(tr.evaluate):
                p.optimizer.rebuild("bench: automatic lifecycle change")
        if slot.stage != "BLENDING":
            raise BenchError(f"bench set-up: slot {blend_slot} did not pass G2 into BLENDING (stage {slot.stage}); "
                             f"its history: {[r.to_dict()['gate'] for r in slot.machine.history]}")
        _germinate(p, train_slot, blueprints[1 % len(blueprints)])
        assert isinstance(p.host, MLPHost)
        # a fresh host carries no Kasmina hooks; it starts from the trainer's weights
        host = build_host(cfg, p.task.input_shape, p.task.n_outputs)
        assert isinstance(host, MLPHost)
        host.load_state_dict(p.host.state_dict())
        blend_mod, train_mod = p.kasmina.slots[blend_slot].module, p.kasmina.slots[train_slot].module
        assert blend_mod is not None and train_mod is not None
        plain = PlainNet(host, p.kasmina.slots[blend_slot].layer, copy.deepcopy(blend_mod),
                         p.kasmina.slots[train_slot].layer, copy.deepcopy(train_mod), cfg.seeds.blend.mode)
        opt = build_optimizer(cfg.trainer, [ParamGroupSpec("host", list(host.parameters())),
                                            ParamGroupSpec("blend", list(plain.blend_seed.parameters())),
                                            ParamGroupSpec("train", list(plain.train_seed.parameters()))])
        return P1Setup(cfg, p, tr.train_step, tr.evaluate, tr.emitter, tr.close, plain, opt, cfg.seeds.blend.steps,
                       blend_slot, train_slot)
    except BaseException:
        tr.close()  # no prefetch thread or controller worker outlives a failed set-up
        raise


def _plain_round(s: P1Setup, epochs: int) -> float:
    cfg = s.cfg
    return p1_round(s.plain, s.plain_opt, s.parts.task, cfg, s.epoch, epochs, s.blend_steps, cfg.trainer.grad_clip)


def _esper_round(s: P1Setup, epochs: int) -> float:
    """ms per step of ``train_step`` (with the per-step context the real epoch loop sets)."""
    p = s.parts
    stats = EpochStats()
    training = [sl for sl in p.kasmina.slots.values() if sl.stage == "TRAINING"]
    steps = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        for x, y in epoch_batches(p.task, s.cfg, s.epoch + e):
            s.emitter.set_context(epoch=s.epoch + e, step=p.state.global_step)
            s.step(x, y, stats, training)
            steps += 1
    dt = time.perf_counter() - t0
    if stats.steps != steps:
        raise BenchError(f"Esper skipped {steps - stats.steps} of {steps} steps during P-1 "
                         f"(emergency level {p.emergency.level}); the timing would not be of healthy steps")
    return dt * 1000.0 / steps


def run_p1(s: P1Setup, plan: BenchPlan) -> tuple[Comparison, EpochStats]:
    p = s.parts
    stages = {n: sl.stage for n, sl in p.kasmina.slots.items()}
    with gc_paused():
        base, mine = alternate(lambda: _plain_round(s, plan.p1_epochs_per_round),
                               lambda: _esper_round(s, plan.p1_epochs_per_round),
                               warmup=plan.warmup, repeats=plan.repeats)
    stats = EpochStats()
    for x, y in epoch_batches(p.task, s.cfg, s.epoch):
        s.step(x, y, stats, None)
    comp = Comparison(
        "P-1", "train step, 2 active seeds + telemetry", "ms/step", "plain PyTorch loop, same modules",
        "Trainer.train_step", base, mine, 1.05,
        size={"params": p.kasmina.total_params(), "batch_size": s.cfg.data.batch_size,
              "steps_per_round": p.steps_per_epoch * plan.p1_epochs_per_round, "seed_stages": stages,
              "blueprints": {n: sl.blueprint for n, sl in p.kasmina.slots.items()}},
    )
    return comp, stats


def run_p1_controller(s: P1Setup, stats: EpochStats, plan: BenchPlan,
                      step: Comparison) -> tuple[Absolute, Comparison]:
    """The controller on its cadence: one decision per epoch (as the trainer asks it), amortised per step."""
    p = s.parts
    if p.controller is None or p.mediator is None or p.decisions is None:
        raise BenchError("P-1 controller cost needs a controller (seeds.enabled with slots)")
    val = s.evaluate(frozenset())
    epoch = 10_000
    per_decision: list[float] = []
    n = max(plan.repeats, 3) + plan.warmup
    for i in range(n):
        epoch += 1
        obs = p.decisions.observation(epoch, stats, val)
        t0 = time.perf_counter()
        decision = p.controller.adopt(p.mediator.decide("decide", p.controller.payload(obs)))
        dt = (time.perf_counter() - t0) * 1000.0
        for cmd in decision.accepted:
            p.controller.aborted(cmd.command_id, "bench: decision not applied")
        if i >= plan.warmup:
            per_decision.append(dt)
    per_step = [d * 1000.0 / p.steps_per_epoch for d in per_decision]
    isolation = s.cfg.controller.isolation
    ctrl = Absolute("P-1c", f"controller per step ({isolation}, 1 decision/epoch amortised)",
                    "us/step", per_step, size={"steps_per_epoch": p.steps_per_epoch},
                    extra={"decision_ms": summarize(per_decision), "isolation": isolation})
    add = statistics.median(per_step) / 1000.0  # ms/step
    total = Comparison("P-1+c", "train step + controller on cadence", "ms/step", step.baseline_label,
                       "train_step + amortised decision", list(step.baseline), [v + add for v in step.esper],
                       1.05, size=step.size, extra={"controller_ms_per_step": add})
    return ctrl, total
