"""P-5 (lifecycle transition and command validation cost, in µs) and P-6 (controller decision latency, in
process and through the trainer's own mediator)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from esper.app.bench.stats import Absolute, BenchError, BenchPlan, BenchUnsupported, gc_paused
from esper.core.config import EsperConfig
from esper.core.kasmina import GateResult
from esper.core.tamiyo import Command, Tamiyo, ValidationContext, command_id, validate
from esper.core.tolaria import ControllerWorker, Mediator
from esper.statemachines import SEED, StrictMachine

# ------------------------------------------------------------------------------------------------- P-5


_SEED_CYCLE: tuple[tuple[str, GateResult | None], ...] = (
    ("germinate", GateResult("G0", True, "bench")),
    ("cull", None),
    ("embargo", None),
    ("reset", None),
    ("reactivate", GateResult("G5", True, "bench")),
)


def _per_op_us(fn: Callable[[int], None], ops: int, plan: BenchPlan) -> list[float]:
    """µs per operation over ``repeats`` timed batches of ``ops`` operations (after the warm-up batches)."""
    out: list[float] = []
    with gc_paused():
        for i in range(plan.warmup + plan.repeats):
            t0 = time.perf_counter()
            fn(ops)
            dt = time.perf_counter() - t0
            if i >= plan.warmup:
                out.append(dt * 1e6 / ops)
    return out


def run_p5(cfg: EsperConfig, plan: BenchPlan) -> list[Absolute]:
    cycle = len(_SEED_CYCLE)
    ops = max(cycle, plan.micro_ops // cycle * cycle)

    def fire(n: int) -> None:
        m = StrictMachine(SEED, "bench")
        for i in range(n // cycle):
            for trigger, gate in _SEED_CYCLE:
                m.fire(trigger, reason=f"bench {i}", gate=gate)
        if m.state != "DORMANT":
            raise BenchError(f"seed cycle ended in {m.state}, not DORMANT")

    def may(n: int) -> None:
        m = StrictMachine(SEED, "bench")
        hits = sum(1 for _ in range(n) if m.may("germinate"))
        if hits != n:
            raise BenchError("may('germinate') from DORMANT was False")

    names = [s.name for s in cfg.seeds.slots] or ["s1"]
    blueprints = cfg.seeds.blueprints
    issued = frozenset(command_id(e, i) for e, i in zip(range(100), range(100), strict=True))
    ctx = ValidationContext(frozenset(names), frozenset(blueprints), frozenset(blueprints), "bench", 7, issued,
                            {n: tuple(blueprints) for n in names}, {n: "features [N, 6]" for n in names})
    cmd = Command(command_id=command_id(7, 500), run_id="bench", epoch=7, kind="germinate", slot=names[0],
                  blueprint=blueprints[0], reason="bench", reason_code="plateau",
                  issued_at="2024-01-01T00:00:00+00:00")
    stages = {n: "DORMANT" for n in names}

    def check(n: int) -> None:
        ok = sum(1 for _ in range(n) if validate(cmd, stages, ctx).ok)
        if ok != n:
            raise BenchError(f"the bench's germinate command did not validate: {validate(cmd, stages, ctx).reason}")

    return [
        Absolute("P-5/fire", "seed transition (StrictMachine.fire, gated + ungated)", "us", _per_op_us(fire, ops, plan),
                 size={"ops_per_batch": ops}),
        Absolute("P-5/may", "trigger legality check (StrictMachine.may)", "us", _per_op_us(may, ops, plan),
                 size={"ops_per_batch": ops}),
        Absolute("P-5/validate", "command validation (tamiyo.validate)", "us", _per_op_us(check, ops, plan),
                 size={"ops_per_batch": ops}),
    ]


# ------------------------------------------------------------------------------------------------- P-6


def observations(cfg: EsperConfig, run_id: str, candidates: Mapping[str, dict[str, Any]],
                 start_epoch: int, n: int) -> Iterator[dict[str, Any]]:
    """Realistic end-of-epoch observations cycling through the situations the policy meets: a plateau with
    free slots (germinate), seeds training and blending (nothing), a seed on probation (fossilize), a stalled
    seed (cull). ``candidates`` holds each slot's layout as Kasmina reports it (``Kasmina.slot_view``)."""
    names = [s.name for s in cfg.seeds.slots]
    bp = cfg.seeds.blueprints
    scenarios: list[list[tuple[str, str | None, int, float, float | None]]] = [
        [("DORMANT", None, 0, 0.0, None), ("DORMANT", None, 0, 0.0, None)],
        [("TRAINING", bp[0], 1, 0.0, None), ("DORMANT", None, 0, 0.0, None)],
        [("BLENDING", bp[0], 0, 0.5, None), ("TRAINING", bp[-1], 1, 0.0, None)],
        [("PROBATIONARY", bp[0], 1, 1.0, 0.05), ("BLENDING", bp[-1], 0, 0.25, None)],
        [("SHADOWING", bp[0], 0, 1.0, None), ("TRAINING", bp[-1], cfg.controller.stall_epochs, 0.0, None)],
    ]
    for i in range(n):
        epoch = start_epoch + i
        scenario = scenarios[i % len(scenarios)]
        slots = []
        for j, name in enumerate(names):
            stage, blueprint, eis, alpha, gain = scenario[j] if j < len(scenario) else ("DORMANT", None, 0, 0.0, None)
            slots.append({"name": name, "stage": stage, "blueprint": blueprint, "epochs_in_stage": eis,
                          "alpha": alpha, "seed_loss_improvement": 0.1 if stage == "TRAINING" else None,
                          "counterfactual_gain": gain, **candidates[name]})
        yield {"run_id": run_id, "epoch": epoch, "train_loss": 0.5 + 0.001 * (i % 3),
               "val_loss": 0.6 - 0.0005 * (i % 2), "val_metrics": {"val_accuracy": 0.8},
               "primary_metric": "val_accuracy", "direction": "max", "step_latency_ms": 1.0,
               "rollbacks_total": 0, "total_params": 682,
               "slots": slots}


def run_p6(cfg: EsperConfig, candidates: Mapping[str, dict[str, Any]], plan: BenchPlan, mediator: Mediator,
           run_id: str) -> list[Absolute]:
    """Decision latency in-process, and through the trainer's mediator (the worker process by default)."""
    if not cfg.seeds.slots:
        raise BenchUnsupported("P-6 needs seeds.slots (the controller decides about slots)")
    out: list[Absolute] = []
    inline = Tamiyo(cfg.controller, cfg.seeds, "bench-p6")
    times: list[float] = []
    accepted = 0
    with gc_paused():
        for i, obs in enumerate(observations(cfg, "bench-p6", candidates, 1, plan.decisions + 10)):
            t0 = time.perf_counter()
            decision = inline.decide(obs)
            dt = (time.perf_counter() - t0) * 1000.0
            for cmd in decision.accepted:
                inline.aborted(cmd.command_id, "bench: not applied")
            accepted += len(decision.accepted)
            if i >= 10:
                times.append(dt)
    if accepted == 0:
        raise BenchError("P-6 observations led to no accepted command; they are not realistic enough")
    out.append(Absolute("P-6", "controller decision (Tamiyo.decide, in-process)", "ms", times,
                        size={"decisions": len(times)}, extra={"accepted_commands": accepted}))
    if plan.worker_decisions:
        # the trainer's own mediator and endpoint (controller.isolation decides process or inline)
        mine = Tamiyo(cfg.controller, cfg.seeds, run_id)
        endpoint = mediator.controller
        wtimes: list[float] = []
        for i, obs in enumerate(observations(cfg, run_id, candidates, 1, plan.worker_decisions + 3)):
            payload = mine.payload(obs)
            t0 = time.perf_counter()
            decision = mine.adopt(mediator.decide("decide", payload))
            dt = (time.perf_counter() - t0) * 1000.0
            for cmd in decision.accepted:
                mine.aborted(cmd.command_id, "bench: not applied")
            if i >= 3:
                wtimes.append(dt)
        startup = endpoint.last_startup_ms if isinstance(endpoint, ControllerWorker) else None
        out.append(Absolute("P-6/mediated", f"controller decision via mediator ({cfg.controller.isolation})", "ms",
                            wtimes, goal_max=float(cfg.controller.timeout_ms), size={"decisions": len(wtimes)},
                            extra={"worker_startup_ms": startup, "isolation": cfg.controller.isolation}))
    return out
