"""The performance harness behind ``esper bench`` (SPEC §9, P-1..P-6, plus peak memory).

Every comparison runs its baseline and Esper alternately (A B A B ...) in one process after a warm-up, so a
noisy neighbour slows both sides alike; what is reported is the median and min/max of each side and the
Esper/baseline ratio of every pair. Absolute times are noise on shared machines; ratios are the figures.

``torch.save`` appears here once, as the baseline P-4 times; nothing is ever loaded with ``torch.load``.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import esper
from esper.core.checkpoint import load_checkpoint, write_checkpoint
from esper.core.config import BenchConfig, EsperConfig
from esper.core.data import batches
from esper.core.errors import EsperError, ExitCode
from esper.core.host import MLPHost, build_host
from esper.core.kasmina.gates import GateResult
from esper.core.mediator import ControllerWorker, Mediator
from esper.core.rundir import RunDir
from esper.core.tamiyo import Command, Tamiyo, ValidationContext, command_id, validate
from esper.core.telemetry import Emitter
from esper.core.tolaria.rollback import FastSnapshot, live_tensors
from esper.core.tolaria.state import Position, capture
from esper.core.tolaria.trainer import EpochStats, Trainer
from esper.statemachines import SEED, StrictMachine

SCHEMA = "esper.bench/1"
Progress = Callable[[str], None]


class BenchError(EsperError):
    """The bench could not set up or run a measurement (the figures would not mean what they say)."""


class BenchUnsupported(BenchError):
    """The configuration asks for something a baseline is not written for (exit code: config)."""

    exit_code = ExitCode.CONFIG


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class BenchPlan:
    """How much of everything to run: the full plan from ``[bench]``, or the reduced ``--quick`` one."""

    quick: bool
    warmup: int
    repeats: int
    p1_epochs_per_round: int  # data epochs one timed P-1 round trains (both sides)
    rollback_sizes: tuple[int, ...]  # parameter counts for P-2; 0 = the default model
    checkpoint_sizes: tuple[int, ...]  # parameter counts for P-3/P-4; 0 = the default model
    micro_ops: int  # operations per timed P-5 batch
    decisions: int  # P-6 in-process decisions
    worker_decisions: int  # P-6 decisions through the process worker
    memory_epochs: int  # epochs of the `esper train` / plain-loop subprocesses
    memory_pairs: int
    memory_concurrent: bool  # run the pair side by side (RSS does not depend on it; wall time does)

    @classmethod
    def from_config(cls, cfg: BenchConfig, *, quick: bool) -> BenchPlan:
        if quick:
            return cls(quick=True, warmup=min(cfg.warmup, 1), repeats=min(cfg.repeats, 3), p1_epochs_per_round=1,
                       rollback_sizes=(0, 1_000_000), checkpoint_sizes=(0, 1_000_000), micro_ops=2_000,
                       decisions=60, worker_decisions=15, memory_epochs=1, memory_pairs=1,
                       memory_concurrent=True)
        return cls(quick=False, warmup=cfg.warmup, repeats=cfg.repeats, p1_epochs_per_round=4,
                   rollback_sizes=tuple(cfg.rollback_sizes), checkpoint_sizes=(0, 10_000_000), micro_ops=20_000,
                   decisions=400, worker_decisions=100, memory_epochs=3, memory_pairs=min(cfg.repeats, 2),
                   memory_concurrent=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


# ------------------------------------------------------------------------------------------- statistics


def summarize(samples: list[float]) -> dict[str, float | int]:
    """median / min / max / p50 / p99 of a non-empty sample list."""
    if not samples:
        raise BenchError("no samples to summarize")
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "p50": _percentile(ordered, 50.0), "p99": _percentile(ordered, 99.0), "n": len(ordered)}


def _percentile(ordered: list[float], q: float) -> float:
    """Linear-interpolated percentile of sorted data (numpy's default method)."""
    pos = (len(ordered) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class Comparison:
    """Baseline vs Esper, measured in alternating pairs; samples are in ``unit``."""

    id: str
    name: str
    unit: str
    baseline_label: str
    esper_label: str
    baseline: list[float]
    esper: list[float]
    goal_ratio: float | None
    size: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratios(self) -> list[float]:
        return [e / b for b, e in zip(self.baseline, self.esper, strict=True)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def met(self) -> bool | None:
        return None if self.goal_ratio is None else self.ratio <= self.goal_ratio

    def to_dict(self) -> dict[str, Any]:
        ratios = self.ratios
        return {
            "id": self.id, "name": self.name, "kind": "ratio", "unit": self.unit, "size": self.size,
            "baseline": {"label": self.baseline_label, **_side(self.baseline)},
            "esper": {"label": self.esper_label, **_side(self.esper)},
            "ratio": {"unit": "esper/baseline", "median": self.ratio, "min": min(ratios), "max": max(ratios),
                      "per_pair": ratios},
            "goal": None if self.goal_ratio is None else {"max_ratio": self.goal_ratio},
            "met": self.met,
            "extra": self.extra,
        }


def _side(samples: list[float]) -> dict[str, Any]:
    s = summarize(samples)
    return {"median": s["median"], "min": s["min"], "max": s["max"], "n": s["n"], "samples": list(samples)}


@dataclass
class Absolute:
    """A cost with no baseline (a latency, a per-operation cost); samples are in ``unit``."""

    id: str
    name: str
    unit: str
    samples: list[float]
    goal_max: float | None = None  # compared with the worst sample, in ``unit``
    size: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def met(self) -> bool | None:
        return None if self.goal_max is None else max(self.samples) <= self.goal_max

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "kind": "absolute", "unit": self.unit, "size": self.size,
            "value": summarize(self.samples),
            "goal": None if self.goal_max is None else {"max": self.goal_max, "unit": self.unit, "applies_to": "max"},
            "met": self.met,
            "extra": self.extra,
        }


Result = Comparison | Absolute


def alternate(baseline: Callable[[], float], esper_side: Callable[[], float], *, warmup: int,
              repeats: int) -> tuple[list[float], list[float]]:
    """Run ``warmup`` untimed pairs, then ``repeats`` timed pairs, baseline first in each pair (ABAB...).

    Each callable performs one round and returns the figure it measured (so it can leave set-up untimed).
    """
    for _ in range(warmup):
        baseline()
        esper_side()
    base: list[float] = []
    mine: list[float] = []
    for _ in range(repeats):
        base.append(baseline())
        mine.append(esper_side())
    if any(v <= 0.0 for v in base):
        raise BenchError(f"baseline measured a non-positive time {base}; the timer is too coarse")
    return base, mine


@contextmanager
def _gc_paused() -> Iterator[None]:
    # a collection landing inside one side's round would be charged to it alone
    was = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


# --------------------------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpu_count": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "esper": esper.__version__,
    }


# ------------------------------------------------------------------------------------------------- P-1


def _xent(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y)


class PlainNet(nn.Module):
    """The same host and seed modules with the same math, written as one plain forward.

    The BLENDING seed reads the detached activation of its layer and is mixed in with ``alpha``; the TRAINING
    seed's own path substitutes its output at its layer and runs the rest of the host on it (the host is not
    trained by that path). Both paths share the host prefix computed once.
    """

    def __init__(self, host: MLPHost, blend_layer: str, blend_seed: nn.Module, train_layer: str,
                 train_seed: nn.Module, blend_mode: str) -> None:
        super().__init__()
        if blend_mode not in ("convex", "residual"):
            raise BenchUnsupported(f"P-1 baseline implements the convex and residual blends, not {blend_mode!r}")
        self.host = host
        self.blend_seed = blend_seed
        self.train_seed = train_seed
        self.blend_layer = blend_layer
        self.train_layer = train_layer
        self.blend_mode = blend_mode
        self.alpha = 0.0

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x
        seed_h: torch.Tensor | None = None
        for i in range(1, self.host.depth + 1):
            name = f"hidden{i}"
            layer = getattr(self.host, name)
            h = layer(h)
            if seed_h is not None:
                seed_h = layer(seed_h)
            if name == self.blend_layer:
                s = self.blend_seed(h.detach())
                if self.blend_mode == "convex":
                    h = (1.0 - self.alpha) * h + self.alpha * s
                else:
                    h = h + self.alpha * (s - h.detach())
                if seed_h is not None:
                    s2 = self.blend_seed(seed_h)
                    seed_h = (1.0 - self.alpha) * seed_h + self.alpha * s2 if self.blend_mode == "convex" else (
                        seed_h + self.alpha * (s2 - seed_h))
            if name == self.train_layer:
                seed_h = self.train_seed(h.detach())
        if seed_h is None:
            raise BenchError(f"layer {self.train_layer!r} is not a hidden layer of the host")
        return self.host.head(h), self.host.head(seed_h)


@dataclass
class _P1Setup:
    trainer: Trainer
    plain: PlainNet
    plain_opt: torch.optim.Optimizer
    blend_steps: int
    blend_slot: str
    train_slot: str
    epoch: int = 1000  # data epochs used for timing (disjoint from the set-up epochs)


def _build_trainer(cfg: EsperConfig, scratch: Path) -> Trainer:
    path = scratch / "p1-run"
    (path / "checkpoints").mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(path, "bench")
    trainer = Trainer(cfg, run_dir, emitter=Emitter(None, "bench", cfg.telemetry))
    trainer.build()
    return trainer


def _germinate(tr: Trainer, slot: str, blueprint: str) -> None:
    """Germinate through G0 and start training through G1, exactly as the trainer applies a command."""
    tr.kasmina.germinate(slot, blueprint, reason="bench: germinate")
    tr.rebuild_optimizer(f"bench germinated {slot}")
    result = tr.kasmina.probe_g1(slot, *tr.probe, _xent)
    if not result.passed:
        raise BenchError(f"bench set-up: G1 failed for {blueprint} in {slot}: {result.reason}")
    tr.kasmina.start_training(slot, result, reason=result.reason)


def _train_epoch(tr: Trainer, epoch: int) -> EpochStats:
    stats = EpochStats()
    training = [s for s in tr.kasmina.slots.values() if s.stage == "TRAINING"]
    for x, y in batches(tr.data, tr.cfg.data.batch_size, tr.cfg.run.seed, epoch):
        tr.emitter.set_context(epoch=epoch, step=tr.global_step)
        tr.train_step(x, y, stats, training)
    return stats


def setup_p1(cfg: EsperConfig, scratch: Path) -> _P1Setup:
    """A built trainer with one seed BLENDING and one TRAINING, reached through the real gates."""
    if not cfg.seeds.enabled or len(cfg.seeds.slots) < 2:
        raise BenchUnsupported("P-1 needs seeds.enabled = true and at least two seeds.slots")
    if cfg.host.factory != "mlp":
        raise BenchUnsupported("P-1's plain baseline is written for the built-in MLP host (host.factory = 'mlp')")
    tr = _build_trainer(cfg, scratch)
    try:
        blend_slot, train_slot = cfg.seeds.slots[0].name, cfg.seeds.slots[1].name
        blueprints = cfg.seeds.blueprints
        _germinate(tr, blend_slot, blueprints[0])
        slot = tr.kasmina.slots[blend_slot]
        epoch = 0
        while slot.stage == "TRAINING" and epoch < cfg.seeds.min_training_epochs + 3:
            epoch += 1
            _train_epoch(tr, epoch)
            if tr.kasmina.end_epoch(tr.evaluate):
                tr.rebuild_optimizer("bench: automatic lifecycle change")
        if slot.stage != "BLENDING":
            raise BenchError(f"bench set-up: slot {blend_slot} did not pass G2 into BLENDING (stage {slot.stage}); "
                             f"its history: {[r.to_dict()['gate'] for r in slot.machine.history]}")
        _germinate(tr, train_slot, blueprints[1 % len(blueprints)])
        assert isinstance(tr.host, MLPHost)
        # a fresh host carries no Kasmina hooks; it starts from the trainer's weights
        host = build_host(cfg, tr.data.n_features, tr.data.n_classes)
        assert isinstance(host, MLPHost)
        host.load_state_dict(tr.host.state_dict())
        blend_mod, train_mod = tr.kasmina.slots[blend_slot].module, tr.kasmina.slots[train_slot].module
        assert blend_mod is not None and train_mod is not None
        plain = PlainNet(host, tr.kasmina.slots[blend_slot].layer, copy.deepcopy(blend_mod),
                         tr.kasmina.slots[train_slot].layer, copy.deepcopy(train_mod), cfg.seeds.blend.mode)
        tc = cfg.trainer
        groups = [{"params": list(host.parameters())}, {"params": list(plain.blend_seed.parameters())},
                  {"params": list(plain.train_seed.parameters())}]
        opt: torch.optim.Optimizer
        if tc.optimizer == "sgd":
            opt = torch.optim.SGD(groups, lr=tc.lr, momentum=tc.momentum, weight_decay=tc.weight_decay)
        else:
            opt = torch.optim.AdamW(groups, lr=tc.lr, weight_decay=tc.weight_decay)
        return _P1Setup(tr, plain, opt, cfg.seeds.blend.steps, blend_slot, train_slot)
    except BaseException:
        tr.close()  # no prefetch thread or controller worker outlives a failed set-up
        raise


def _plain_round(s: _P1Setup, epochs: int) -> float:
    """ms per step of a hand-written loop over the same batches."""
    net, opt, tc = s.plain, s.plain_opt, s.trainer.cfg
    train_params = list(net.train_seed.parameters())
    all_params = [p for g in opt.param_groups for p in g["params"]]
    steps, loss_sum, correct, step = 0, 0.0, 0, 0
    t0 = time.perf_counter()
    for e in range(epochs):
        for x, y in batches(s.trainer.data, tc.data.batch_size, tc.run.seed, s.epoch + e):
            opt.zero_grad(set_to_none=True)
            net.alpha = min(1.0, step / s.blend_steps)
            logits, seed_logits = net(x)
            loss = F.cross_entropy(logits, y)
            loss_sum += loss.item()
            loss.backward()
            seed_loss = F.cross_entropy(seed_logits, y)
            for p, g in zip(train_params, torch.autograd.grad(seed_loss, train_params), strict=True):
                p.grad = g
            if tc.trainer.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(all_params, tc.trainer.grad_clip)
            opt.step()
            correct += int((logits.detach().argmax(dim=1) == y).sum())
            steps += 1
            step += 1
    dt = time.perf_counter() - t0
    if not loss_sum == loss_sum:  # NaN: the figures would be of a broken loop
        raise BenchError("plain P-1 loop produced a NaN loss")
    return dt * 1000.0 / steps


def _esper_round(s: _P1Setup, epochs: int) -> float:
    """ms per step of ``Trainer.train_step`` (with the per-step context the real epoch loop sets)."""
    tr = s.trainer
    stats = EpochStats()
    training = [sl for sl in tr.kasmina.slots.values() if sl.stage == "TRAINING"]
    steps = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        for x, y in batches(tr.data, tr.cfg.data.batch_size, tr.cfg.run.seed, s.epoch + e):
            tr.emitter.set_context(epoch=s.epoch + e, step=tr.global_step)
            tr.train_step(x, y, stats, training)
            steps += 1
    dt = time.perf_counter() - t0
    if stats.steps != steps:
        raise BenchError(f"Esper skipped {steps - stats.steps} of {steps} steps during P-1 "
                         f"(emergency level {tr.emergency.level}); the timing would not be of healthy steps")
    return dt * 1000.0 / steps


def run_p1(s: _P1Setup, plan: BenchPlan) -> tuple[Comparison, EpochStats]:
    tr = s.trainer
    stages = {n: sl.stage for n, sl in tr.kasmina.slots.items()}
    with _gc_paused():
        base, mine = alternate(lambda: _plain_round(s, plan.p1_epochs_per_round),
                               lambda: _esper_round(s, plan.p1_epochs_per_round),
                               warmup=plan.warmup, repeats=plan.repeats)
    stats = EpochStats()
    for x, y in batches(tr.data, tr.cfg.data.batch_size, tr.cfg.run.seed, s.epoch):
        tr.train_step(x, y, stats)
    comp = Comparison(
        "P-1", "train step, 2 active seeds + telemetry", "ms/step", "plain PyTorch loop, same modules",
        "Trainer.train_step", base, mine, 1.05,
        size={"params": tr.kasmina.total_params(), "batch_size": tr.cfg.data.batch_size,
              "steps_per_round": tr.steps_per_epoch * plan.p1_epochs_per_round, "seed_stages": stages,
              "blueprints": {n: sl.blueprint for n, sl in tr.kasmina.slots.items()}},
    )
    return comp, stats


def run_p1_controller(s: _P1Setup, stats: EpochStats, plan: BenchPlan,
                      step: Comparison) -> tuple[Absolute, Comparison]:
    """The controller on its cadence: one decision per epoch (as the trainer asks it), amortised per step."""
    tr = s.trainer
    if tr.controller is None or tr.mediator is None:
        raise BenchError("P-1 controller cost needs a controller (seeds.enabled with slots)")
    val_loss, val_acc = tr.evaluate(frozenset())
    epoch = 10_000
    per_decision: list[float] = []
    n = max(plan.repeats, 3) + plan.warmup
    for i in range(n):
        epoch += 1
        obs = tr._observation(epoch, stats, val_loss, val_acc)
        t0 = time.perf_counter()
        decision = tr.controller.adopt(tr.mediator.decide("decide", tr.controller.payload(obs)))
        dt = (time.perf_counter() - t0) * 1000.0
        for cmd in decision.accepted:
            tr.controller.aborted(cmd.command_id, "bench: decision not applied")
        if i >= plan.warmup:
            per_decision.append(dt)
    per_step = [d * 1000.0 / tr.steps_per_epoch for d in per_decision]
    ctrl = Absolute("P-1c", f"controller per step ({tr.cfg.controller.isolation}, 1 decision/epoch amortised)",
                    "us/step", per_step, size={"steps_per_epoch": tr.steps_per_epoch},
                    extra={"decision_ms": summarize(per_decision), "isolation": tr.cfg.controller.isolation})
    add = statistics.median(per_step) / 1000.0  # ms/step
    total = Comparison("P-1+c", "train step + controller on cadence", "ms/step", step.baseline_label,
                       "train_step + amortised decision", list(step.baseline), [v + add for v in step.esper],
                       1.05, size=step.size, extra={"controller_ms_per_step": add})
    return ctrl, total


# ------------------------------------------------------------------------------------------------- P-2


def linear_stack(n_params: int, seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A plain stack of Linear layers with about ``n_params`` parameters and SGD-momentum state.

    Values do not matter to a copy, so the layers skip their random init and are filled (which also
    touches every page, so no first-touch fault lands inside a timed round).
    """
    width = 256 if n_params < 1_000_000 else 1024 if n_params < 50_000_000 else 4096
    per_layer = width * width + width
    layers = max(1, round(n_params / per_layer))
    model = nn.Sequential(*(torch.nn.utils.skip_init(nn.Linear, width, width) for _ in range(layers)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(float(torch.rand((), generator=gen)) + i)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates the momentum buffers, so the state holds optimizer tensors too
    opt.zero_grad(set_to_none=True)
    return model, opt


def module_tensors(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Model and optimizer tensors by stable name (the generic form of ``rollback.live_tensors``)."""
    out = {f"model/{k}": (v.data if isinstance(v, nn.Parameter) else v)
           for k, v in model.state_dict(keep_vars=True).items()}
    index = 0
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"optimizer/{index}.{key}"] = value
            index += 1
    return out


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_p2(get_tensors: Callable[[], dict[str, torch.Tensor]], label: str, params: int, plan: BenchPlan,
           sla_ms: float) -> tuple[Comparison, Absolute]:
    """FastSnapshot.restore_into (live tensors gathered as the rollback does) vs copy_ from preallocated buffers."""
    live = get_tensors()
    snapshot = FastSnapshot()
    captures: list[float] = []
    for _ in range(2):
        t0 = time.perf_counter()
        snapshot.capture(live)
        captures.append((time.perf_counter() - t0) * 1000.0)
    buffers = {k: torch.empty_like(v).copy_(v) for k, v in live.items()}
    pairs = [(live[k], buffers[k]) for k in live]

    def memcpy() -> float:
        t0 = time.perf_counter()
        with torch.no_grad():
            for dst, src in pairs:
                dst.copy_(src)
        return (time.perf_counter() - t0) * 1000.0

    def fast() -> float:
        t0 = time.perf_counter()
        snapshot.restore_into(get_tensors())
        return (time.perf_counter() - t0) * 1000.0

    with _gc_paused():
        base, mine = alternate(memcpy, fast, warmup=plan.warmup, repeats=plan.repeats)
    nbytes = _nbytes(live)
    size = {"model": label, "params": params, "tensors": len(live), "bytes": nbytes}
    comp = Comparison(f"P-2/{label}", f"fast rollback restore ({label})", "ms", "copy_ from preallocated buffers",
                      "FastSnapshot.restore_into", base, mine, 1.5, size=size,
                      extra={"capture_ms": captures, "esper_GBps": nbytes / 1e6 / statistics.median(mine)})
    sla = Absolute(f"P-2/{label}/SLA", f"fast rollback latency ({label}) vs rollback.fast_sla_ms", "ms", mine,
                   goal_max=sla_ms, size=size)
    return comp, sla


# --------------------------------------------------------------------------------------------- P-3 / P-4


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def run_p3_p4(tensors: dict[str, dict[str, torch.Tensor]], payload: dict[str, Any], label: str, params: int,
              root: Path, plan: BenchPlan, keep_last: int, full_sla_ms: float) -> list[Result]:
    """P-4 write_checkpoint vs torch.save of the same tensors; P-3 load_checkpoint vs raw load_file.

    Two informational pairs split the gap: torch.save followed by the same fsyncs (the price of durability),
    and a read of every byte followed by safetensors' own deserialization (the price of the sha256 check;
    ``load_file`` memory-maps, so it need not read the data at all).
    """
    root.mkdir(parents=True, exist_ok=True)
    ckpt_root = root / "checkpoints"
    flat = {f"{stem}/{k}": v for stem, group in tensors.items() for k, v in group.items()}
    pt_path = root / "baseline.pt"
    counter = iter(range(1_000_000))
    written: list[Path] = []

    def save() -> float:
        t0 = time.perf_counter()
        torch.save(flat, pt_path)  # the P-4 baseline; never loaded back
        return (time.perf_counter() - t0) * 1000.0

    def save_synced() -> float:
        t0 = time.perf_counter()
        torch.save(flat, pt_path)
        _fsync_path(pt_path)
        _fsync_path(root)
        return (time.perf_counter() - t0) * 1000.0

    def write() -> float:
        name = f"bench-{next(counter):06d}"
        t0 = time.perf_counter()
        written.append(write_checkpoint(ckpt_root, name, tensors, payload, keep_last=keep_last))
        return (time.perf_counter() - t0) * 1000.0

    with _gc_paused():
        wb, wm = alternate(save, write, warmup=plan.warmup, repeats=plan.repeats)
        sb, sm = alternate(save_synced, write, warmup=0, repeats=plan.repeats)
    ckpt = written[-1]
    files = sorted(ckpt.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    size = {"model": label, "params": params, "files": len(files), "bytes": nbytes}
    p4 = Comparison(f"P-4/{label}", f"checkpoint write ({label})", "ms", "torch.save (no fsync)",
                    "write_checkpoint (atomic, fsynced, verified)", wb, wm, 1.2, size=size,
                    extra={"torch_save_bytes": pt_path.stat().st_size})
    p4b = Comparison(f"P-4b/{label}", f"checkpoint write vs fsynced torch.save ({label})", "ms",
                     "torch.save + fsync(file, dir)", "write_checkpoint", sb, sm, None, size=size)

    def raw() -> float:
        t0 = time.perf_counter()
        for f in files:
            safetensors.torch.load_file(f)
        return (time.perf_counter() - t0) * 1000.0

    def read_all() -> float:
        t0 = time.perf_counter()
        for f in files:
            safetensors.torch.load(f.read_bytes())
        return (time.perf_counter() - t0) * 1000.0

    def verified() -> float:
        t0 = time.perf_counter()
        load_checkpoint(ckpt)
        return (time.perf_counter() - t0) * 1000.0

    with _gc_paused():
        rb, rm = alternate(raw, verified, warmup=plan.warmup, repeats=plan.repeats)
        bb, bm = alternate(read_all, verified, warmup=0, repeats=plan.repeats)
    p3 = Comparison(f"P-3/{label}", f"full restore, verified ({label})", "ms", "safetensors.torch.load_file",
                    "load_checkpoint (sha256 + load)", rb, rm, 1.5, size=size)
    p3b = Comparison(f"P-3b/{label}", f"full restore vs read + deserialize ({label})", "ms",
                     "read_bytes + safetensors.torch.load", "load_checkpoint", bb, bm, None, size=size)
    sla = Absolute(f"P-3/{label}/SLA", f"verified load ({label}) vs full_sla_ms", "ms", rm + bm,
                   goal_max=full_sla_ms, size=size)
    pt_path.unlink()
    return [p3, p3b, sla, p4, p4b]


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
    with _gc_paused():
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
    ctx = ValidationContext.build(cfg.seeds, "bench", 7, issued)
    cmd = Command(command_id=command_id(7, 500), run_id="bench", epoch=7, kind="germinate", slot=names[0],
                  blueprint=blueprints[0], reason="bench", reason_code="plateau",
                  issued_at="2024-01-01T00:00:00+00:00")
    stages = {n: "DORMANT" for n in names}
    if not cfg.seeds.slots:
        ctx = ValidationContext(frozenset(names), frozenset(blueprints), frozenset(blueprints), "bench", 7, issued)

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


def observations(cfg: EsperConfig, run_id: str, candidates: Mapping[str, dict[str, int]],
                 start_epoch: int, n: int) -> Iterator[dict[str, Any]]:
    """Realistic end-of-epoch observations cycling through the situations the policy meets: a plateau with
    free slots (germinate), seeds training and blending (nothing), a seed on probation (fossilize), a stalled
    seed (cull)."""
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
                          "counterfactual_gain": gain, "candidate_params": dict(candidates[name])})
        yield {"run_id": run_id, "epoch": epoch, "train_loss": 0.5 + 0.001 * (i % 3),
               "val_loss": 0.6 - 0.0005 * (i % 2), "val_accuracy": 0.8, "step_latency_ms": 1.0,
               "rollbacks_total": 0, "total_params": 682,
               "slots": slots}


def run_p6(cfg: EsperConfig, candidates: Mapping[str, dict[str, int]], plan: BenchPlan, mediator: Mediator,
           run_id: str) -> list[Absolute]:
    """Decision latency in-process, and through the trainer's mediator (the worker process by default)."""
    if not cfg.seeds.slots:
        raise BenchUnsupported("P-6 needs seeds.slots (the controller decides about slots)")
    out: list[Absolute] = []
    inline = Tamiyo(cfg.controller, cfg.seeds, "bench-p6")
    times: list[float] = []
    accepted = 0
    with _gc_paused():
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


# ---------------------------------------------------------------------------------------------- memory


_PLAIN_SCRIPT = r"""
import json, sys
import torch
import torch.nn.functional as F
from torch import nn
a = json.loads(sys.argv[1])
torch.manual_seed(a["seed"])
if a["task"] == "digits":
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    classes = 10
else:
    g = torch.Generator().manual_seed(a["seed"] + 7919)
    x = torch.randn(a["samples"], a["features"], generator=g)
    w1 = torch.randn(a["features"], 32, generator=g)
    w2 = torch.randn(32, a["classes"], generator=g)
    y = (torch.tanh(x @ w1) @ w2).argmax(dim=1)
    classes = a["classes"]
order = torch.randperm(len(x))
n_val = max(1, round(len(x) * a["val_fraction"]))
xv, yv, xt, yt = x[order[:n_val]], y[order[:n_val]], x[order[n_val:]], y[order[n_val:]]
act = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}[a["activation"]]
dims = [x.shape[1], *a["hidden"]]
layers = []
for i, o in zip(dims[:-1], dims[1:]):
    layers += [nn.Linear(i, o), act()]
model = nn.Sequential(*layers, nn.Linear(dims[-1], classes))
opt = torch.optim.SGD(model.parameters(), lr=a["lr"], momentum=a["momentum"])
for epoch in range(a["epochs"]):
    perm = torch.randperm(len(xt))
    for s in range(0, len(xt), a["batch_size"]):
        idx = perm[s:s + a["batch_size"]]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step()
    with torch.no_grad():
        val = F.cross_entropy(model(xv), yv).item()
print(json.dumps({"val_loss": val}))
"""


# A small launcher runs each measured child and reports the child's own peak RSS. Measuring from this process
# would be wrong: a forked child's ru_maxrss starts at the RSS of the (large) process that forked it.
_LAUNCHER = r"""
import json, resource, subprocess, sys, time
argv = json.loads(sys.argv[1])
t0 = time.perf_counter()
proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
wall = time.perf_counter() - t0
sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
print(json.dumps({"returncode": proc.returncode, "wall_s": wall,
                  "maxrss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _run_child(argv: list[str], cwd: Path, timeout_s: float) -> tuple[float, float]:
    """Run a child to completion; return (its peak RSS in MiB, its wall time in s). Raises on failure."""
    try:
        proc = subprocess.run([sys.executable, "-c", _LAUNCHER, json.dumps(argv)], cwd=cwd, capture_output=True,
                              text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"memory child {argv[1:4]} ran past {timeout_s:.0f} s and was killed") from exc
    if proc.returncode != 0:
        raise BenchError(f"memory launcher exited {proc.returncode}: {proc.stderr[-2000:]}")
    report = json.loads(proc.stdout)
    if report["returncode"] != 0:
        raise BenchError(f"memory child {' '.join(argv[1:5])} exited {report['returncode']}: {proc.stderr}")
    # Linux reports ru_maxrss in KiB, macOS in bytes
    kib = report["maxrss"] if sys.platform != "darwin" else report["maxrss"] / 1024.0
    return kib / 1024.0, float(report["wall_s"])


def run_memory(cfg: EsperConfig, scratch: Path, plan: BenchPlan) -> Comparison:
    """Peak RSS of a real `esper train` subprocess vs a plain training script subprocess (same task/model)."""
    if cfg.data.task not in ("digits", "synthetic"):
        raise BenchUnsupported("the memory baseline supports data.task 'digits' or 'synthetic'")
    root = scratch / "memory"
    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "config.toml"
    config_file.write_text(cfg.to_toml())
    d, tc = cfg.data, cfg.trainer
    plain_args = json.dumps({"seed": cfg.run.seed, "task": d.task, "samples": d.synthetic_samples,
                             "features": d.synthetic_features, "classes": d.synthetic_classes,
                             "val_fraction": d.val_fraction, "hidden": cfg.host.hidden,
                             "activation": cfg.host.activation, "lr": tc.lr, "momentum": tc.momentum,
                             "batch_size": d.batch_size, "epochs": plan.memory_epochs})
    counter = iter(range(1000))

    def esper_argv() -> list[str]:
        run_dir = root / f"run-{next(counter)}"
        return [sys.executable, "-m", "esper", "train", "--config", str(config_file),
                "--set", f"trainer.epochs={plan.memory_epochs}", "--run-dir", str(run_dir), "--json"]

    walls: dict[str, list[float]] = {"baseline": [], "esper": []}

    def plain() -> float:
        rss, wall = _run_child([sys.executable, "-c", _PLAIN_SCRIPT, plain_args], root, 300.0)
        walls["baseline"].append(wall)
        return rss

    def train() -> float:
        rss, wall = _run_child(esper_argv(), root, 300.0)
        walls["esper"].append(wall)
        return rss

    if plan.memory_concurrent:
        base, mine = [], []
        with ThreadPoolExecutor(max_workers=2) as pool:
            for _ in range(plan.memory_pairs):
                fb, fe = pool.submit(plain), pool.submit(train)
                base.append(fb.result())
                mine.append(fe.result())
    else:
        base, mine = alternate(plain, train, warmup=0, repeats=plan.memory_pairs)
    return Comparison("MEM", f"peak RSS, {plan.memory_epochs}-epoch training run (subprocess)", "MiB",
                      "plain training script", "esper train", base, mine, None,
                      size={"epochs": plan.memory_epochs, "task": d.task, "hidden": list(cfg.host.hidden)},
                      extra={"wall_s": walls, "concurrent": plan.memory_concurrent})


# ------------------------------------------------------------------------------------------------- run


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
        tr = setup.trainer
        try:
            p1, stats = run_p1(setup, plan)
            results.append(p1)
            say("P-1 controller on its cadence")
            results.extend(run_p1_controller(setup, stats, plan, p1))
            say("P-2 fast rollback (default model)")
            results.extend(run_p2(lambda: live_tensors(tr), "default", tr.kasmina.total_params(), plan,
                                  cfg.rollback.fast_sla_ms))
            say("P-3/P-4 checkpoint (default model)")
            tensors, payload = capture(tr, Position(1, 0, tr.global_step), "bench")
            results.extend(run_p3_p4(tensors, payload, "default", tr.kasmina.total_params(),
                                     scratch / "ckpt-default", plan, cfg.checkpoint.keep_last,
                                     cfg.rollback.full_sla_ms))
            candidates = {name: tr.kasmina.candidate_params(name) for name in tr.kasmina.slots}
            say("P-6 controller decision latency")
            assert tr.mediator is not None  # run_p1_controller checked
            results.extend(run_p6(cfg, candidates, plan, tr.mediator, tr.run_id))
        finally:
            tr.close()
        for n in plan.rollback_sizes:
            if n == 0:
                continue
            say(f"P-2 fast rollback ({_label(n)} params)")
            model, opt = linear_stack(n, cfg.run.seed)
            params = sum(p.numel() for p in model.parameters())
            results.extend(run_p2(lambda m=model, o=opt: module_tensors(m, o), _label(n), params, plan,
                                  cfg.rollback.fast_sla_ms))
            del model, opt
            gc.collect()
        for n in plan.checkpoint_sizes:
            if n == 0:
                continue
            say(f"P-3/P-4 checkpoint ({_label(n)} params)")
            model, opt = linear_stack(n, cfg.run.seed)
            flat = module_tensors(model, opt)
            groups: dict[str, dict[str, torch.Tensor]] = {"model": {}, "optimizer": {}}
            for key, t in flat.items():
                stem, _, name = key.partition("/")
                groups[stem][name] = t
            params = sum(p.numel() for p in model.parameters())
            results.extend(run_p3_p4(groups, {"bench": True, "params": params}, _label(n), params,
                                     scratch / f"ckpt-{_label(n)}", plan, cfg.checkpoint.keep_last,
                                     cfg.rollback.full_sla_ms))
            del model, opt, flat, groups
            gc.collect()
        say("P-5 lifecycle transition and validation cost")
        results.extend(run_p5(cfg, plan))
        say("memory: peak RSS of esper train vs a plain loop")
        results.append(run_memory(cfg, scratch, plan))
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


__all__ = [
    "SCHEMA", "Absolute", "BenchError", "BenchPlan", "BenchUnsupported", "Comparison", "PlainNet", "alternate",
    "linear_stack", "machine_info", "module_tensors", "observations", "run_bench", "summarize",
]
