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

from esper.app.bench.baseline import PlainLoop, PlainNet, epoch_batches, host_blocks
from esper.app.bench.stats import (
    Absolute,
    BenchError,
    BenchPlan,
    BenchUnsupported,
    Comparison,
    Skipped,
    alternate,
    gc_paused,
    summarize,
)
from esper.core.config import EsperConfig
from esper.core.kasmina import SeedSlot, param_count
from esper.core.model.host import build_host
from esper.core.model.optim import ParamGroupSpec, build_optimizer
from esper.core.records.rundir import RunDir
from esper.core.records.telemetry import Emitter
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
    plain: PlainLoop
    blend_slot: str
    train_slot: str
    epoch: int = 1000  # data epochs used for timing (disjoint from the set-up epochs)
    max_steps: int = 0  # steps of one timed round at most (0: whole epochs)


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
    """A built trainer with one seed BLENDING and one TRAINING, reached through the real gates, and the plain
    side starting from exactly its state (weights, optimizer state, step counters)."""
    if not cfg.seeds.enabled or len(cfg.seeds.slots) < 2:
        raise BenchUnsupported("P-1 needs seeds.enabled = true and at least two seeds.slots", key="seeds.enabled")
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
        return P1Setup(cfg, p, tr.train_step, tr.evaluate, tr.emitter, tr.close, plain_side(cfg, p),
                       blend_slot, train_slot)
    except BaseException:
        tr.close()  # no prefetch thread or controller worker outlives a failed set-up
        raise


def plain_side(cfg: EsperConfig, p: Parts) -> PlainLoop:
    """The plain loop on copies of the trainer's host (no Kasmina hooks) and seeds, with its optimizer state,
    LR schedule position and alpha ramp position: from here both sides compute the same steps."""
    slots = list(p.kasmina.slots.values())
    blend, train = (next((s for s in slots if s.stage == stage), None) for stage in ("BLENDING", "TRAINING"))
    if blend is None or train is None or blend.module is None or train.module is None:
        raise BenchError(f"P-1's plain side needs one BLENDING and one TRAINING seed; stages: "
                         f"{ {s.name: s.stage for s in slots} }")
    host_blocks(p.host)  # an unsupported host is refused before anything is copied
    host = build_host(cfg, p.task.input_shape, p.task.n_outputs)
    host.load_state_dict(p.host.state_dict())
    host.train(p.host.training)
    plain = PlainNet(host, blend.layer, copy.deepcopy(blend.module), train.layer, copy.deepcopy(train.module),
                     cfg.seeds.blend.mode)
    groups = {"blend": list(plain.blend_seed.parameters()), "train": list(plain.train_seed.parameters())}
    names = {blend.name: "blend", train.name: "train"}
    specs = [ParamGroupSpec("host", list(host.parameters()))]
    specs += [ParamGroupSpec(names[g.name.removeprefix("seed:")], groups[names[g.name.removeprefix("seed:")]])
              for g in p.kasmina.param_groups()[1:]]  # the trainer's group order, so its state loads in place
    opt = build_optimizer(cfg.trainer, specs)
    # a copy: load_state_dict keeps tensors of the right dtype/device as they are, so the two optimizers would
    # share (and both update) the same moment buffers
    opt.load_state_dict(copy.deepcopy(p.optimizer.optimizer.state_dict()))
    return PlainLoop(plain, opt, p.task, cfg, p.schedule.factor, cfg.seeds.blend.steps,
                     global_step=p.state.global_step, alpha_step=blend.stats.alpha_step)


def _plain_round(s: P1Setup, epochs: int) -> float:
    return s.plain.round(s.epoch, epochs, s.max_steps)


def esper_round(s: P1Setup, epochs: int) -> float:
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
            if steps == s.max_steps:
                break
        if steps == s.max_steps:
            break
    dt = time.perf_counter() - t0
    if stats.steps != steps:
        raise BenchError(f"Esper skipped {steps - stats.steps} of {steps} steps during P-1 "
                         f"(emergency level {p.emergency.level}); the timing would not be of healthy steps")
    return dt * 1000.0 / steps


def run_p1(s: P1Setup, plan: BenchPlan, *, rid: str = "P-1", epochs: int = 0,
           goal: float = 1.15) -> tuple[Comparison, EpochStats]:
    """Plain loop vs ``train_step``, alternating rounds of ``epochs`` data epochs (``plan``'s when 0)."""
    p = s.parts
    epochs = epochs or plan.p1_epochs_per_round
    stages = {n: sl.stage for n, sl in p.kasmina.slots.items()}
    with gc_paused():
        base, mine = alternate(lambda: _plain_round(s, epochs), lambda: esper_round(s, epochs),
                               warmup=plan.warmup, repeats=plan.repeats)
    stats = EpochStats()
    for i, (x, y) in enumerate(epoch_batches(p.task, s.cfg, s.epoch)):
        if i == s.max_steps > 0:
            break
        s.step(x, y, stats, None)
    steps = s.max_steps or p.steps_per_epoch * epochs
    comp = Comparison(
        rid, f"train step ({s.cfg.host.factory} host), 2 active seeds + telemetry", "ms/step",
        "plain PyTorch loop, same modules", "Trainer.train_step", base, mine, goal,
        size={"params": p.kasmina.total_params(), "host_params": param_count(p.host),
              "batch_size": s.cfg.data.batch_size, "steps_per_round": steps, "seed_stages": stages,
              "blueprints": {n: sl.blueprint for n, sl in p.kasmina.slots.items()}},
    )
    return comp, stats


def host_row_config(cfg: EsperConfig, plan: BenchPlan) -> EsperConfig:
    """The config of P-1/cnn: the run's config with the cnn host at ``bench.p1_host_channels``/``_kernels``; the
    seeds' parameter budget is lifted so the blueprints fit the wider slots."""
    host = cfg.host.model_copy(update={"channels": list(plan.p1_host_channels),
                                       "kernels": list(plan.p1_host_kernels)})
    budget = cfg.seeds.param_budget if isinstance(cfg.seeds.param_budget, int) else 0
    seeds = cfg.seeds.model_copy(update={"param_budget": max(budget, 100_000_000)})
    return cfg.model_copy(update={"host": host, "seeds": seeds})


def run_p1_host(cfg: EsperConfig, plan: BenchPlan, scratch: Path) -> Comparison | Skipped:
    """P-1/cnn: the step on a realistic host (goal 1.05), a set-up of its own, ``plan.p1_host_steps`` a round."""
    name = "train step on a realistic cnn host"
    if cfg.host.factory != "cnn":
        return Skipped("P-1/cnn", name, f"host.factory is {cfg.host.factory!r}: the row measures the cnn host "
                                        "(host.factory = 'cnn' with a [N, C, L] or [N, C, H, W] task, e.g. mnist1d)")
    s = setup_p1(host_row_config(cfg, plan), scratch / "p1-host")
    try:
        s.max_steps = plan.p1_host_steps
        comp, _ = run_p1(s, plan, rid="P-1/cnn", epochs=1, goal=1.05)
    finally:
        s.close()
    comp.name = name
    return comp


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
                       step.goal_ratio, size=step.size, extra={"controller_ms_per_step": add})
    return ctrl, total
