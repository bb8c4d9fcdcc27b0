"""Peak memory: a real ``esper train`` process against the plain-PyTorch training process of ``baseline`` on the
same task and model, each measured by its own launcher (``launcher``), so neither is charged for this one."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from esper.app.bench import baseline, launcher
from esper.app.bench.stats import BenchError, BenchPlan, Comparison, alternate
from esper.core.config import EsperConfig


def run_child(argv: list[str], cwd: Path, timeout_s: float) -> tuple[float, float]:
    """Run a child to completion; return (its peak RSS in MiB, its wall time in s). Raises on failure."""
    try:
        proc = subprocess.run([sys.executable, "-m", launcher.__name__, json.dumps(argv)], cwd=cwd,
                              capture_output=True, text=True, timeout=timeout_s, check=False)
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
    """Peak RSS of a real `esper train` subprocess vs the plain training process (same config, task, model)."""
    root = scratch / "memory"
    root.mkdir(parents=True, exist_ok=True)
    config_file = root / "config.toml"
    config_file.write_text(cfg.to_toml())
    plain_argv = [sys.executable, "-m", baseline.__name__, "--config", str(config_file),
                  "--epochs", str(plan.memory_epochs)]
    counter = iter(range(1000))

    def esper_argv() -> list[str]:
        run_dir = root / f"run-{next(counter)}"
        return [sys.executable, "-m", "esper", "train", "--config", str(config_file),
                "--set", f"trainer.epochs={plan.memory_epochs}", "--run-dir", str(run_dir), "--json"]

    walls: dict[str, list[float]] = {"baseline": [], "esper": []}

    def plain() -> float:
        rss, wall = run_child(plain_argv, root, 300.0)
        walls["baseline"].append(wall)
        return rss

    def train() -> float:
        rss, wall = run_child(esper_argv(), root, 300.0)
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
                      "plain training process", "esper train", base, mine, None,
                      size={"epochs": plan.memory_epochs, "task": cfg.data.task, "hidden": list(cfg.host.hidden)},
                      extra={"wall_s": walls, "concurrent": plan.memory_concurrent})
