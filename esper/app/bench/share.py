"""P-9: what checkpointing every epoch costs a real run. The configured job trains in a process of its own
(`esper train`, every epoch checkpointed); the loop's seconds inside checkpointing (writing, or staging with
``checkpoint.async``, settling a background write, re-verifying ``latest``: summary.json ``checkpointing``) as a
share of the run's wall time from its start record to its summary. Goal (CheckFreq): at most 3.5%."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import datetime
from pathlib import Path

from esper.app.bench.stats import Absolute, BenchError, BenchPlan
from esper.core.config import EsperConfig

GOAL_PERCENT = 3.5


def run_p9(cfg: EsperConfig, scratch: Path, plan: BenchPlan) -> Absolute:
    epochs, runs = (2, 1) if plan.quick else (6, 2)
    every = cfg.checkpoint.model_copy(update={"every_epochs": 1})
    config = scratch / "p9.toml"
    config.write_text(cfg.model_copy(update={"faults": [], "checkpoint": every}).to_toml())
    samples: list[float] = []
    written = 0
    for k in range(runs):
        run = scratch / f"p9-{k}"
        cmd = [sys.executable, "-m", "esper", "--config", str(config), "train", "--quiet", "--run-dir", str(run),
               "--set", f"trainer.epochs={epochs}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"P-9: the run exited {done.returncode}: {done.stderr[-2000:]}")
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        wall = (datetime.fromisoformat(summary["finished"]) - datetime.fromisoformat(summary["started"]))
        samples.append(100.0 * summary["checkpointing"]["loop_seconds"] / wall.total_seconds())
        written = summary["checkpointing"]["written"]
    return Absolute("P-9", "checkpointing's share of a run's wall time (every epoch checkpointed)", "%", samples,
                    goal_max=GOAL_PERCENT, size={"epochs": epochs, "checkpoints": written})
