"""P-7: training steps per second at 1 and 2 processes for the same global batch (gloo, CPU), as a ratio
measured in one run. Each side is a real `esper train` under torch's elastic launcher (the 1-process side too,
so both pay the same launcher), alternated in pairs; a side's pace is the steps between its first and last
``epoch.completed`` events over the time between them (start-up, the first epoch and the final write are out)."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from esper.app.bench.p1 import host_row_config
from esper.app.bench.stats import BenchPlan
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


def run_p7_rows(cfg: EsperConfig, scratch: Path, plan: BenchPlan) -> list[dict[str, Any]]:
    """P-7 on the configured job (``P-7/default``: no goal, "no slower than before") and on the cnn host of
    P-1/cnn (``P-7/cnn``, goal >= 1.8x; skipped, with the reason, for another host). ``plan.quick``: one pair of
    2-epoch runs each (and P-1/cnn's quick host), the shape of the figures only."""
    kw: dict[str, int] = {"epochs": 2, "pairs": 1} if plan.quick else {}
    rows = [{**run_p7(cfg, scratch / "default", **kw), "id": "P-7/default", "goal": None}]
    if cfg.host.factory != "cnn" or not plan.p1_host_channels:
        rows.append({"id": "P-7/cnn", "skipped": f"host.factory is {cfg.host.factory!r}: the row measures the cnn "
                     "host at bench.p1_host_channels (host.factory = 'cnn', e.g. the shipped mnist1d job)"})
        return rows
    row = run_p7(host_row_config(cfg, plan), scratch / "cnn", **kw)
    rows.append({**row, "id": "P-7/cnn", "channels": list(plan.p1_host_channels), "goal": CNN_GOAL,
                 "met": row["ratio"] >= CNN_GOAL})
    return rows


def run_p7(cfg: EsperConfig, scratch: Path, *, epochs: int = 4, pairs: int = 2) -> dict[str, Any]:
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
                raise RuntimeError(f"P-7 run at {n} process(es) failed ({done.returncode}): {done.stderr[-2000:]}")
            pace[n].append(_pace(run))
    one, two = statistics.median(pace[1]), statistics.median(pace[2])
    return {"id": "P-7", "name": "steps/s at 2 processes vs 1 (same global batch, gloo, cpu)",
            "global_batch": cfg.data.batch_size, "epochs": epochs, "pairs": pairs, "cores": os.cpu_count(),
            "steps_per_s": {"1": pace[1], "2": pace[2]}, "median": {"1": one, "2": two}, "ratio": two / one}
