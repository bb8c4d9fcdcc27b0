"""`esper compare`: does growing pay on this model? The configured run grown, the host alone (seeds disabled) and
optionally a static larger host and the final-size network trained from scratch, each over the same run seeds;
every run is a real run directory.

The figures are read back from each run's own ``summary.json`` (its task's primary metric, ``final.val_loss``,
``final.params``, ``compute``) and ``metrics.jsonl`` (the primary metric against cumulative training FLOPs), so the
comparison says exactly what ``esper train`` would have said for each run. With a scratch variant (or a
``--target``) it also answers the compute question (``compute_to_target``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from esper.app.compute_target import GROWN, HOST, SCRATCH, STATIC, VARIANTS, compute_to_target, curve
from esper.app.session import TrainSession
from esper.app.views.read import read_summary
from esper.core.config import EsperConfig, from_dict
from esper.core.errors import ConfigError, EsperError, ExitCode, UsageError
from esper.core.records import machine
from esper.core.records.rundir import new_run_id, write_atomic

SEEDS_OFF = "seeds.enabled=false"
_RANGE = re.compile(r"^(\d+)\.\.(\d+)$")
_LIST = re.compile(r"^\d+(,\d+)*$")
MAX_RUNS_PER_VARIANT = 1000
# a run stopped by the operator stops the comparison: the remaining runs are not started
STOPPING = {int(ExitCode.SIGINT), int(ExitCode.SIGTERM)}


def parse_seeds(text: str) -> list[int]:
    """``1..5`` (inclusive) or ``1,3,7`` -> the run seeds, in order, without duplicates."""
    text = text.strip()
    if m := _RANGE.match(text):
        lo, hi = int(m.group(1)), int(m.group(2))
        if hi < lo:
            raise ConfigError(f"--seeds {text!r}: the range is empty (write LOW..HIGH, e.g. 1..5)")
        seeds = list(range(lo, hi + 1))
    elif _LIST.match(text):
        seeds = list(dict.fromkeys(int(s) for s in text.split(",")))
    else:
        raise ConfigError(f"--seeds {text!r}: expected a range LOW..HIGH (1..5) or a list (1,3,7)")
    if len(seeds) > MAX_RUNS_PER_VARIANT:
        raise ConfigError(f"--seeds {text!r}: {len(seeds)} seeds; at most {MAX_RUNS_PER_VARIANT}")
    return seeds


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...]  # --set items applied on top of the configured run


def variants(static_host: Sequence[str], scratch: Sequence[str] = ()) -> list[Variant]:
    out = [Variant(GROWN, ()), Variant(HOST, (SEEDS_OFF,))]
    if static_host:
        out.append(Variant(STATIC, (*static_host, SEEDS_OFF)))
    if scratch:
        out.append(Variant(SCRATCH, (*scratch, SEEDS_OFF)))
    return out


def variant_config(base: EsperConfig, variant: Variant, seed: int) -> EsperConfig:
    return from_dict(base.to_dict(), [*variant.overrides, f"run.seed={seed}", f'run.run_id="{variant.name}-s{seed}"'])


def check_variants(base: EsperConfig, found: list[Variant], seed: int) -> None:
    """Every variant's config must validate before the first run starts: a bad --static-host is exit 3 at once."""
    for v in found:
        try:
            variant_config(base, v, seed)
        except ConfigError as exc:
            origin = {STATIC: "--static-host", SCRATCH: "--scratch"}.get(v.name, v.name)
            raise ConfigError(f"{origin} {list(v.overrides[:-1]) or list(v.overrides)}: {exc}") from exc


@dataclass
class RunResult:
    variant: str
    seed: int
    run_dir: str
    exit_code: int
    status: str
    primary: float | None = None
    val_loss: float | None = None
    params: int | None = None
    wall_s: float | None = None  # None: read back by --from, which did not time the run
    error: str | None = None
    flops: int | None = None  # the run's cumulative training FLOPs (summary.json compute)
    uncounted_ops: dict[str, int] = field(default_factory=dict)
    curve: list[tuple[int, int, float, float]] = field(default_factory=list)  # (epoch, FLOPs, seconds, primary)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.primary is not None


@dataclass
class Comparison:
    out: str
    seeds: list[int]
    variants: list[Variant]
    primary_metric: str | None = None
    direction: str | None = None
    runs: list[RunResult] = field(default_factory=list)
    stopped: bool = False
    target: float | None = None  # --target; None: each seed's scratch run's final primary metric

    @property
    def exit_code(self) -> int:
        codes = [r.exit_code for r in self.runs]
        return max(codes) if codes else 0

    def of(self, variant: str) -> list[RunResult]:
        return [r for r in self.runs if r.variant == variant]

    def delta(self, a: str, b: str) -> dict[str, Any] | None:
        """Per seed ``a - b`` of the primary metric, over the seeds where both runs succeeded."""
        if not any(v.name == a for v in self.variants) or not any(v.name == b for v in self.variants):
            return None
        ra = {r.seed: r.primary for r in self.of(a) if r.ok}
        rb = {r.seed: r.primary for r in self.of(b) if r.ok}
        per_seed = {s: ra[s] - rb[s] for s in self.seeds if s in ra and s in rb}  # type: ignore[operator]
        vals = list(per_seed.values())
        return {"per_seed": {str(s): d for s, d in per_seed.items()},
                "min": min(vals) if vals else None, "mean": statistics.fmean(vals) if vals else None,
                "max": max(vals) if vals else None}

    def to_doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "out": self.out, "seeds": self.seeds, "primary_metric": self.primary_metric,
            "direction": self.direction, "exit_code": self.exit_code, "stopped": self.stopped, "variants": {},
            "machine": machine.describe(),
        }
        for v in self.variants:
            runs = self.of(v.name)
            ok = [r for r in runs if r.ok]
            doc["variants"][v.name] = {
                "overrides": list(v.overrides),
                "runs": [asdict(r) for r in runs],
                "completed": len(ok),
                "primary": _stats([r.primary for r in ok]),
                "val_loss": _stats([r.val_loss for r in ok]),
                "params": _stats([r.params for r in ok]),
                "wall_s": _stats([r.wall_s for r in runs]),
                "flops": _stats([r.flops for r in ok]),
            }
        doc["deltas"] = {name: d for name, d in (("grown-host", self.delta(GROWN, HOST)),
                                                  ("grown-static", self.delta(GROWN, STATIC))) if d is not None}
        doc["compute_to_target"] = compute_to_target(self)
        return doc


def _stats(values: Sequence[float | int | None]) -> dict[str, float | None]:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "min": min(vals), "max": max(vals)}


Progress = Callable[[RunResult, int, int], None]


def run_one(cfg: EsperConfig, variant: str, seed: int, run_dir: Path) -> tuple[RunResult, dict[str, Any] | None]:
    t0 = time.monotonic()
    try:
        TrainSession.prepare(cfg, run_dir=run_dir).run(reporter=None)
    except EsperError as exc:
        return RunResult(variant, seed, str(run_dir), int(exc.exit_code), "ERROR", wall_s=time.monotonic() - t0,
                         error=str(exc)), None
    return read_back(variant, seed, run_dir, time.monotonic() - t0)


def read_back(variant: str, seed: int, run_dir: Path, wall_s: float | None
              ) -> tuple[RunResult, dict[str, Any] | None]:
    """A run as its own files say (``summary.json``, ``metrics.jsonl``), read as outside input: the comparison
    reports exactly what ``esper train`` said, and ``--from`` reads runs it did not make."""
    written, problems = read_summary(run_dir)
    if written is None or not isinstance(written.get("exit_code"), int):
        why = "; ".join(problems) or "summary.json has no exit code"
        return RunResult(variant, seed, str(run_dir), int(ExitCode.INTERNAL), "UNREADABLE", wall_s=wall_s,
                         error=why), None
    task, final, compute = (d if isinstance(d := written.get(k), dict) else {} for k in ("task", "final", "compute"))
    key = task.get("primary_metric") if isinstance(task.get("primary_metric"), str) else None
    flops = compute.get("flops")
    uncounted = compute.get("uncounted_ops")
    result = RunResult(variant, seed, str(run_dir), written["exit_code"], str(written.get("status")),
                       primary=_num(final.get(key)) if key else None, val_loss=_num(final.get("val_loss")),
                       params=final.get("params") if type(final.get("params")) is int else None, wall_s=wall_s,
                       error=_failure_text(written.get("failure")), flops=flops if type(flops) is int else None,
                       uncounted_ops=dict(uncounted) if isinstance(uncounted, dict) else {},
                       curve=curve(run_dir, key) if key else [])
    return result, task


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) else None


_RUN_NAME = re.compile(rf"^({'|'.join(VARIANTS)})-s(\d{{1,9}})$")


def reanalyse(out: Path, target: float | None) -> Comparison:
    """The comparison of the runs already in ``out`` (``esper compare --from``): every VARIANT-sSEED run
    directory read back, nothing trained and nothing written; ``target`` as ``--target``."""
    if not out.is_dir():
        raise UsageError(f"--from {out}: not a directory of compared runs", key="--from")
    found: dict[str, set[int]] = {}
    for entry in out.iterdir():
        m = _RUN_NAME.match(entry.name)
        if m and entry.is_dir() and not entry.is_symlink():
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    if not found:
        raise UsageError(f"--from {out}: no run directories named VARIANT-sSEED (grown-s1, scratch-s1, ...)",
                         key="--from")
    kinds = [Variant(n, ()) for n in VARIANTS if n in found]
    result = Comparison(str(out), sorted(set().union(*found.values())), kinds, target=target)
    for seed in result.seeds:
        for v in kinds:
            if seed in found[v.name]:
                run, task = read_back(v.name, seed, out / f"{v.name}-s{seed}", None)
                result.runs.append(run)
                if task and result.primary_metric is None:
                    result.primary_metric, result.direction = task.get("primary_metric"), task.get("direction")
    return result


def _failure_text(failure: Any) -> str | None:
    if not failure:
        return None
    if isinstance(failure, dict):
        return str(failure.get("message") or failure.get("reason") or json.dumps(failure, sort_keys=True))
    return str(failure)


def compare(base: EsperConfig, seeds: Sequence[int], static_host: Sequence[str], out: Path | None,
            progress: Progress | None = None, scratch: Sequence[str] = (), target: float | None = None) -> Comparison:
    """Run every variant over every seed, sequentially (each run uses ``run.threads`` as configured); with a
    scratch variant, also draw OUT/compute.png (the primary metric against training FLOPs)."""
    found = variants(static_host, scratch)
    check_variants(base, found, seeds[0])
    if out is None:
        fresh = from_dict(base.to_dict(), ['run.run_id=""'])  # a new id even when the config pins run.run_id
        out = Path(base.run.output_dir) / f"compare-{new_run_id(fresh)}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory")
    taken = [out / f"{v.name}-s{s}" for v in found for s in seeds if (out / f"{v.name}-s{s}").exists()]
    if taken:
        raise ConfigError(f"--out {out}: run directories already exist ({', '.join(p.name for p in taken[:3])}); "
                          f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    result = Comparison(str(out), list(seeds), found, target=target)
    total = len(found) * len(seeds)
    for seed in seeds:  # seed-major: an interrupted comparison still has whole seeds to compare
        for v in found:
            run, task = run_one(variant_config(base, v, seed), v.name, seed, out / f"{v.name}-s{seed}")
            result.runs.append(run)
            if task and result.primary_metric is None:
                result.primary_metric, result.direction = task.get("primary_metric"), task.get("direction")
            if progress is not None:
                progress(run, len(result.runs), total)
            if run.exit_code in STOPPING:
                result.stopped = True
                break
        if result.stopped:
            break
    write_atomic(out / "compare.json", json.dumps(result.to_doc(), indent=2) + "\n")
    if any(r.curve for r in result.runs) and (scratch or target is not None):
        from esper.app.compute_plot import render  # matplotlib: paid only when there is a figure to draw

        render(result, out / "compute.png")
    return result
