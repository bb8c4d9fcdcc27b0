"""P-7: training steps per second at 1 and 2 processes for the same global batch (gloo, CPU), as a ratio
measured in one run. Each side is a real `esper train` under torch's elastic launcher (the 1-process side too,
so both pay the same launcher), alternated in pairs; a side's pace is the steps between its first and last
``epoch.completed`` events over the time between them (start-up, the first epoch and the final write are out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from esper.app.bench.p1 import host_row_config
from esper.app.bench.stats import BenchError, BenchPlan, Skipped, Speedup
from esper.core.config import EsperConfig
from esper.core.records.event_log import read_events


def _pace(run: Path) -> float:
    records = read_events(run / "events.jsonl").records
    started = next(e for e in records if e["event"] == "run.started")
    done = [e for e in records if e["event"] == "epoch.completed"]
    if len(done) < 2:
        raise RuntimeError(f"{run}: fewer than 2 epochs completed")
    seconds = (datetime.fromisoformat(done[-1]["utc"]) - datetime.fromisoformat(done[0]["utc"])).total_seconds()
    return started["attributes"]["steps_per_epoch"] * (len(done) - 1) / seconds


# the compute-dominated host's goal (issue 25): 2 processes at >= 1.8x the steps/s of 1 (2.0 is the limit)
CNN_GOAL = 1.8


def run_p7_rows(cfg: EsperConfig, scratch: Path, plan: BenchPlan) -> list[Speedup | Skipped]:
    """P-7 on the configured job (``P-7/default``: no goal, "no slower than before") and on the cnn host of
    P-1/cnn (``P-7/cnn``, goal >= 1.8x; skipped, with the reason, for another host). ``plan.quick``: one pair of
    2-epoch runs each (and P-1/cnn's quick host), the shape of the figures only."""
    kw: dict[str, int] = {"epochs": 2, "pairs": 1} if plan.quick else {}
    name = "steps/s at 2 processes vs 1, same global batch (gloo, cpu)"
    rows: list[Speedup | Skipped] = [run_p7("P-7/default", f"{name}: the configured job", cfg, scratch / "default",
                                            **kw)]
    if cfg.host.factory != "cnn" or not plan.p1_host_channels:
        rows.append(Skipped("P-7/cnn", f"{name}: P-1/cnn's host", f"host.factory is {cfg.host.factory!r}: the row "
                            "measures the cnn host at bench.p1_host_channels (host.factory = 'cnn', e.g. the shipped "
                            "mnist1d job)"))
        return rows
    rows.append(run_p7("P-7/cnn", f"{name}: P-1/cnn's host", host_row_config(cfg, plan), scratch / "cnn",
                       goal=CNN_GOAL, **kw))
    return rows


def run_p7(rid: str, name: str, cfg: EsperConfig, scratch: Path, *, goal: float | None = None, epochs: int = 4,
           pairs: int = 2) -> Speedup:
    """Steps/s at 1 and 2 processes (``pairs`` alternated runs of ``epochs`` each) and their ratio."""
    cfg = cfg.model_copy(update={"faults": []})
    scratch.mkdir(parents=True, exist_ok=True)
    config = scratch / "p7.toml"
    config.write_text(cfg.to_toml())
    pace: dict[int, list[float]] = {1: [], 2: []}
    env = {**os.environ, "OMP_NUM_THREADS": str(cfg.run.threads or 1)}
    for k in range(pairs):
        for n in (1, 2):
            run = scratch / f"p7-{n}-{k}"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
                   "esper", "--config", str(config), "train", "--quiet", "--run-dir", str(run), "--set",
                   f"trainer.epochs={epochs}"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise BenchError(f"{rid} run at {n} process(es) failed ({done.returncode}): {done.stderr[-2000:]}")
            pace[n].append(_pace(run))
    final = json.loads((scratch / "p7-1-0" / "summary.json").read_text(encoding="utf-8"))["final"]
    return Speedup(rid, name, pace[1], pace[2], goal,
                   size={"params": final["params"], "global_batch": cfg.data.batch_size, "epochs": epochs,
                         "pairs": pairs, "cores": os.cpu_count()})
