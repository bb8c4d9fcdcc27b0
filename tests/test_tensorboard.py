"""Optional TensorBoard output (V-4): with the package, a run writes its scalars and lifecycle/emergency events
where TensorBoard reads them (read back here with TensorBoard's own reader); without it, asking for it is exit 3
before anything is written."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from conftest import BASE_TOML, ESPER, GROWING, events, metrics, out, sets, train, without_package

from esper.core.errors import ExitCode


@pytest.mark.slow
def test_tensorboard_gets_the_runs_scalars_alpha_per_seed_and_lifecycle_events(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = train(run, *GROWING, "trainer.epochs=8", "telemetry.tensorboard=true")
    assert result.exit_code == 0, out(result)
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    assert {"loss/train_loss", "loss/val_loss", "metric/val_accuracy", "metric/train_accuracy", "run/lr",
            "run/params", "run/emergency_level", "alpha/s1", "alpha/s2"} <= scalars
    rows = metrics(run)
    assert [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("loss/val_loss")] == \
        [(r["epoch"], r["val_loss"]) for r in rows]
    assert [e.value for e in acc.Scalars("run/params")] == [r["params"] for r in rows]
    assert max(e.value for e in acc.Scalars("alpha/s1")) > 0.0  # a seed blended in
    blended = [(e["epoch"], s["alpha_mean"]) for e in events(run) if e["event"] == "epoch.completed"
               for s in e["attributes"]["slots"] if s["slot"] == "s1" and "alpha_mean" in s]  # as events.jsonl has it
    assert blended and [(e.step, pytest.approx(e.value, rel=1e-6)) for e in acc.Scalars("alpha_mean/s1")] == blended
    texts = set(acc.Tags()["tensors"])
    assert {"events/run.started/text_summary", "events/seed.transition/text_summary",
            "events/checkpoint.written/text_summary"} <= texts


def test_tensorboard_is_off_by_default(tmp_path: Path) -> None:
    result = train(tmp_path / "run", *GROWING, "trainer.epochs=1", "controller.isolation=inline")
    assert result.exit_code == 0, out(result)
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_asking_for_tensorboard_without_the_package_is_exit_3_before_anything_is_written(tmp_path: Path) -> None:
    env = without_package(tmp_path, "tensorboard")
    run = tmp_path / "run"
    done = subprocess.run([str(ESPER), "--config", str(BASE_TOML), "train", "--quiet", "--run-dir", str(run),
                           *sets(*GROWING, "telemetry.tensorboard=true")], env=env, capture_output=True, text=True)
    assert done.returncode == ExitCode.CONFIG, done.stdout + done.stderr
    assert "'tensorboard' needs the optional 'tensorboard' package, which is not installed" in done.stderr
    assert "pip install 'esper[tensorboard]'" in done.stderr and "Traceback" not in done.stderr
    assert not run.exists()
    off = subprocess.run([str(ESPER), "--config", str(BASE_TOML), "train", "--quiet", "--run-dir", str(run),
                          *sets(*GROWING, "trainer.epochs=1", "controller.isolation=inline")],
                         env=env, capture_output=True, text=True)
    assert off.returncode == 0, off.stdout + off.stderr  # off (the default), the missing package is no concern
