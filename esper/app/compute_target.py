"""The compute question of ``esper compare`` (issue 24): per run seed, the cumulative training FLOPs (and training
step seconds) at the first validation where each variant reaches the target, and what growing saved against
training the final size from scratch: ``saving = 1 - FLOPs_grown / FLOPs_scratch``.

The target is ``--target`` when given, else each seed's scratch run's own final primary metric: "reach what the big
model reaches, for less". A variant that never reaches it is "not reached" (no saving is claimed for it). The
granularity is one validation, i.e. one epoch: FLOPs are read at the end of the first epoch that reaches it.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from esper.app.views.history import as_num
from esper.app.views.status import Run
from esper.core.tolaria.compute import COUNTED

if TYPE_CHECKING:
    from esper.app.compare import Comparison, RunResult

# the variants of a comparison, in table order (compare builds them; a run directory is VARIANT-sSEED)
GROWN, HOST, STATIC, SCRATCH = "grown", "host", "static", "scratch"
VARIANTS = (GROWN, HOST, STATIC, SCRATCH)


def curve(run_dir: Path, key: str) -> list[tuple[int, int, float, float]]:
    """Per completed epoch of the run: (epoch, cumulative training FLOPs, training step seconds, primary metric);
    rows without FLOP counts are left out."""
    history = Run.load(run_dir).history
    out = []
    for epoch in sorted(history.rows):
        row = history.rows[epoch]
        flops, seconds, value = row.get("flops"), as_num(row.get("step_seconds")), as_num(row.get(key))
        if type(flops) is int and seconds is not None and value is not None:
            out.append((epoch, flops, seconds, value))
    return out


def reached(run: RunResult, target: float, direction: str) -> dict[str, Any] | None:
    """Where ``run`` first reaches ``target`` (epoch, FLOPs, seconds), or None."""
    for epoch, flops, seconds, value in run.curve:
        if (value >= target) if direction == "max" else (value <= target):
            return {"epoch": epoch, "flops": flops, "seconds": seconds, "value": value}
    return None


def compute_to_target(c: Comparison) -> dict[str, Any] | None:
    """The ``compute_to_target`` section of the document; None without a target (no scratch variant, no
    ``--target``)."""
    names = [v.name for v in c.variants]
    if (SCRATCH not in names and c.target is None) or c.direction not in ("max", "min"):
        return None
    runs = {(r.variant, r.seed): r for r in c.runs}
    per_seed: dict[str, Any] = {}
    savings: dict[str, list[float]] = {n: [] for n in names if n != SCRATCH}
    for seed in c.seeds:
        scratch = runs.get((SCRATCH, seed))
        target = c.target if c.target is not None else (scratch.primary if scratch is not None and scratch.ok
                                                        else None)
        if target is None:
            per_seed[str(seed)] = {"target": None, "note": "the scratch run did not complete"}
            continue
        at = {n: (reached(r, target, c.direction) if (r := runs.get((n, seed))) is not None and r.ok else None)
              for n in names}
        entry: dict[str, Any] = {"target": target, "reached": at, "saving": {}}
        base = at.get(SCRATCH)
        for n in savings:
            if at[n] is not None and base is not None and base["flops"] > 0:
                saving = 1.0 - at[n]["flops"] / base["flops"]
                entry["saving"][n] = saving
                savings[n].append(saving)
            else:
                entry["saving"][n] = None
        per_seed[str(seed)] = entry
    return {"target": "scratch final" if c.target is None else c.target, "direction": c.direction,
            "per_seed": per_seed,
            "saving": {n: {"seeds": len(v), "mean": statistics.fmean(v) if v else None,
                           "min": min(v) if v else None, "max": max(v) if v else None} for n, v in savings.items()},
            "counted": COUNTED}
