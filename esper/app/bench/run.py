"""``esper bench``: every measurement in one process run, as one document (``SCHEMA``)."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from esper.app.bench.memory import run_memory
from esper.app.bench.micro import run_p5, run_p6
from esper.app.bench.p1 import run_p1, run_p1_controller, run_p1_host, setup_p1
from esper.app.bench.p1l import run_p1l
from esper.app.bench.p7 import run_p7_rows
from esper.app.bench.share import run_p9
from esper.app.bench.startup import run_p8
from esper.app.bench.state import linear_stack, one_core, run_p2, run_p3_p4, stack_components
from esper.app.bench.stats import SCHEMA, BenchPlan, Progress, Result, machine_info
from esper.core.config import EsperConfig
from esper.core.tolaria import live_tensors


def run_bench(cfg: EsperConfig, plan: BenchPlan, *, progress: Progress | None = None) -> dict[str, Any]:
    """Run every measurement and return the one bench document (``SCHEMA``)."""
    tell = progress or (lambda _msg: None)
    marks: list[tuple[str, float]] = []

    def say(section: str) -> None:
        marks.append((section, time.perf_counter()))
        tell(section)

    cfg = cfg.model_copy(update={"faults": []})  # drills would make the figures about the drill
    t_start = time.perf_counter()
    parent = Path(cfg.run.output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    # scratch lives where run directories live, so checkpoint writes hit the file system real runs use
    scratch = Path(tempfile.mkdtemp(prefix=".bench-", dir=parent)).resolve()  # children run elsewhere
    results: list[Result] = []
    try:
        say("P-1 train step overhead")
        setup = setup_p1(cfg, scratch)
        p = setup.parts
        try:
            p1, stats = run_p1(setup, plan)
            results.append(p1)
            say("P-1L train step against a Lightning Trainer")
            results.append(run_p1l(setup, plan))
            say("P-1 controller on its cadence")
            results.extend(run_p1_controller(setup, stats, plan, p1))
            say("P-2 fast rollback (default model)")
            results.extend(run_p2(lambda: live_tensors(p.components), "default", p.kasmina.total_params(), plan,
                                  cfg.rollback.fast_sla_ms))
            say("P-3/P-4 checkpoint (default model)")
            tensors, payload = p.checkpointer.capture("bench")
            results.extend(run_p3_p4(tensors, payload, "default", p.kasmina.total_params(),
                                     scratch / "ckpt-default", plan, cfg.checkpoint.keep_last,
                                     cfg.rollback.full_sla_ms))
            candidates = {name: p.kasmina.slot_view(name) for name in p.kasmina.slots}
            say("P-6 controller decision latency")
            assert p.mediator is not None  # run_p1_controller checked
            results.extend(run_p6(cfg, candidates, plan, p.mediator, "bench"))
        finally:
            setup.close()
        if plan.p1_host_channels:
            say("P-1/cnn train step on a realistic host")
            results.append(run_p1_host(cfg, plan, scratch))
        for n in plan.rollback_sizes:
            if n == 0:
                continue
            say(f"P-2 fast rollback ({_label(n)} params)")
            model, opt = linear_stack(n, cfg.run.seed)
            params = sum(q.numel() for q in model.parameters())
            stack = stack_components(model, opt)
            results.extend(run_p2(lambda s=stack: live_tensors(s), _label(n), params, plan, cfg.rollback.fast_sla_ms))
            del model, opt, stack
            gc.collect()
        for n in plan.checkpoint_sizes:
            if n == 0:
                continue
            say(f"P-3/P-4 checkpoint ({_label(n)} params)")
            model, opt = linear_stack(n, cfg.run.seed)
            stack = stack_components(model, opt)
            groups, payload = stack.to_checkpoint(stack.state_dict())
            params = sum(q.numel() for q in model.parameters())
            results.extend(run_p3_p4(groups, {**payload, "bench": True, "params": params}, _label(n), params,
                                     scratch / f"ckpt-{_label(n)}", plan, cfg.checkpoint.keep_last,
                                     cfg.rollback.full_sla_ms))
            say(f"P-3/P-4 checkpoint ({_label(n)} params) on one core")
            with one_core():  # a busy training machine: no idle core for the hash (issue 25)
                pinned = run_p3_p4(groups, {**payload, "bench": True, "params": params}, f"{_label(n)}/1core",
                                   params, scratch / f"ckpt-{_label(n)}-1core", plan, cfg.checkpoint.keep_last,
                                   cfg.rollback.full_sla_ms)
            results.extend(r for r in pinned if r.id.split("/")[0] in ("P-3", "P-4") and not r.id.endswith("SLA"))
            del model, opt, stack, groups
            gc.collect()
        say("P-9 checkpointing's share of a real run")
        results.append(run_p9(cfg, scratch, plan))
        say("P-5 lifecycle transition and validation cost")
        results.extend(run_p5(cfg, plan))
        say("memory: peak RSS of esper train vs a plain loop")
        results.append(run_memory(cfg, scratch, plan))
        say("P-8 CLI start-up")
        results.extend(run_p8(scratch, plan))
        say("P-7 scale-out: 2 processes vs 1")
        results.extend(run_p7_rows(cfg, scratch / "p7", plan))
    finally:
        shutil.rmtree(scratch)
    marks.append(("end", time.perf_counter()))
    sections = {name: t1 - t0 for (name, t0), (_, t1) in zip(marks[:-1], marks[1:], strict=True)}
    goals = [r for r in results if r.met is not None]
    return {
        "schema": SCHEMA,
        "quick": plan.quick,
        "machine": machine_info(),
        "plan": plan.to_dict(),
        "results": [r.to_dict() for r in results],
        "summary": {"goals": len(goals), "met": sum(1 for r in goals if r.met),
                    "missed": [r.id for r in goals if not r.met]},
        "wall_s": time.perf_counter() - t_start,
        "sections_s": sections,
    }


def _label(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1_000_000 else f"{n / 1e3:g}k"
