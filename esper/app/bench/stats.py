"""The bench's vocabulary: the plan, the statistics of alternating measurements and the machine they ran on.

Every comparison runs its baseline and Esper alternately (A B A B ...) in one process after a warm-up, so a
noisy neighbour slows both sides alike; what is reported is the median and min/max of each side and the
Esper/baseline ratio of every pair. Absolute times are noise on shared machines; ratios are the figures.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

import esper
from esper.core.config import BenchConfig
from esper.core.errors import EsperError, ExitCode
from esper.core.records import machine

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
    p1_host_steps: int  # steps of one timed round of P-1/cnn (the realistic host: each step costs more)
    p1_host_channels: tuple[int, ...]  # the P-1/cnn host's channels; () leaves the row out
    p1_host_kernels: tuple[int, ...]
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
                       p1_host_steps=2, p1_host_channels=tuple(max(1, c // 8) for c in cfg.p1_host_channels),
                       p1_host_kernels=tuple(cfg.p1_host_kernels),
                       rollback_sizes=(0, 1_000_000), checkpoint_sizes=(0, 1_000_000), micro_ops=2_000,
                       decisions=60, worker_decisions=15, memory_epochs=1, memory_pairs=1,
                       memory_concurrent=True)
        return cls(quick=False, warmup=cfg.warmup, repeats=cfg.repeats, p1_epochs_per_round=4,
                   p1_host_steps=5, p1_host_channels=tuple(cfg.p1_host_channels),
                   p1_host_kernels=tuple(cfg.p1_host_kernels),
                   rollback_sizes=tuple(cfg.rollback_sizes), checkpoint_sizes=tuple(cfg.checkpoint_sizes),
                   micro_ops=20_000, decisions=400, worker_decisions=100, memory_epochs=3,
                   memory_pairs=min(cfg.repeats, 2), memory_concurrent=False)

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


@dataclass
class Speedup:
    """A scale-out figure (P-7): steps/s at 2 processes over 1 for the same global batch; higher is better."""

    id: str
    name: str
    one: list[float]  # steps/s of each 1-process run
    two: list[float]  # ... and of each 2-process run, alternated with them
    goal_min: float | None = None
    size: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return statistics.median(self.two) / statistics.median(self.one)

    @property
    def met(self) -> bool | None:
        return None if self.goal_min is None else self.ratio >= self.goal_min

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "kind": "speedup", "unit": "steps/s", "size": self.size,
            "baseline": {"label": "1 process", **_side(self.one)}, "esper": {"label": "2 processes", **_side(self.two)},
            "ratio": {"median": self.ratio, "unit": "2 processes / 1"},
            "goal": None if self.goal_min is None else {"min_ratio": self.goal_min},
            "met": self.met,
            "extra": self.extra,
        }


@dataclass
class Skipped:
    """A measurement this run could not make, and why (an optional extra not installed, a host it needs)."""

    id: str
    name: str
    reason: str

    met = None

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "kind": "skipped", "reason": self.reason, "goal": None,
                "met": None}


Result = Comparison | Absolute | Speedup | Skipped


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
def gc_paused() -> Iterator[None]:
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
        "cpu_model": machine.cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "esper": esper.__version__,
    }


# ------------------------------------------------------------------------------------------------- P-1
