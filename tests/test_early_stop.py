"""Issue 27: early stopping on the primary metric (trainer.early_stop_patience / early_stop_min_delta)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import UNHURRIED, events, make_config, out, resume, summary, train

from esper.core.data.task import Task
from esper.core.tolaria.early_stop import early_stop


def _task(direction: str) -> Task:
    primary = "accuracy" if direction == "max" else "bpc"
    return Task("t", [], [], (1,), 2, lambda a, b: a, {}, primary=primary, direction=direction)  # type: ignore[arg-type]


def _rows(metric: str, values: list[float]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, metric: v} for i, v in enumerate(values)]


@pytest.mark.parametrize(("direction", "values", "patience", "delta", "stops"), [
    ("max", [0.5, 0.6, 0.6, 0.6], 2, 0.0, True),      # two epochs without a better accuracy
    ("max", [0.5, 0.6, 0.6, 0.61], 2, 0.0, False),    # the last one improved
    ("max", [0.5, 0.6, 0.6, 0.605], 2, 0.01, True),   # by less than min_delta: not an improvement
    ("min", [2.0, 1.5, 1.6, 1.5], 2, 0.0, True),      # bpc: lower is better; equal is no improvement
    ("min", [2.0, 1.5, 1.6, 1.4], 2, 0.0, False),
    ("max", [0.5, 0.5], 2, 0.0, False),               # not enough epochs to judge
    ("max", [0.5, 0.5, 0.5, 0.5], 0, 0.0, False),     # 0: never
])
def test_the_rule(direction: str, values: list[float], patience: int, delta: float, stops: bool) -> None:
    task = _task(direction)
    cfg = make_config(f"trainer.early_stop_patience={patience}", f"trainer.early_stop_min_delta={delta}").trainer
    reason = early_stop(_rows(task.primary_metric, values), task, cfg)
    assert (reason is not None) == stops
    if reason:
        assert reason.startswith(f"early stop: {task.primary_metric} has not improved") and f"for {patience}" in reason


@pytest.mark.slow
def test_a_run_stops_early_completed_and_a_resume_of_it_decides_alike(tmp_path: Path) -> None:
    job = ['data.task="synthetic"', "trainer.lr=1e-6", "trainer.min_lr=0.0", "seeds.enabled=false",
           "trainer.early_stop_patience=2", "trainer.early_stop_min_delta=0.5", *UNHURRIED]  # stops after epoch 3
    run = tmp_path / "run"
    r = train(run, *job, "trainer.epochs=20")
    assert r.exit_code == 0, out(r)
    s = summary(run)
    assert (s["status"], s["epochs_completed"]) == ("COMPLETED", 3)
    [stop] = events(run, "early_stop")
    assert stop["attributes"]["epochs_done"] == 3 and "early stop: val_accuracy" in r.stdout
    split = tmp_path / "split"
    assert train(split, *job, "trainer.epochs=20", extra=["--fault", "sigterm@2:1"]).exit_code == 143
    assert resume(split, *job, "trainer.epochs=20").exit_code == 0
    assert summary(split)["epochs_completed"] == 3
