"""Experiment loggers (issue 27): CSV and MLflow fed by the run's events, read back with the csv module and the
real MLflow client; per-step scalars every telemetry.log_every_steps; a rollback or resume leaves the run as it
stands; a missing package is exit 3 before anything is written."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest
from conftest import ESPER, GROWING, SYNTHETIC, UNHURRIED, metrics, out, sets, summary, train, without_package

from esper.core.errors import ExitCode

PLAIN = [*SYNTHETIC, *UNHURRIED, "seeds.enabled=false", "trainer.epochs=3"]


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_csv_holds_every_epoch_row_and_the_per_step_scalars(tmp_path: Path) -> None:
    run = tmp_path / "r"
    result = train(run, *GROWING, "trainer.epochs=4", 'telemetry.loggers=["csv"]', "telemetry.log_every_steps=2")
    assert result.exit_code == 0, out(result)
    rows, epochs = metrics(run), _csv(run / "csv" / "epochs.csv")
    assert [int(r["epoch"]) for r in epochs] == [r["epoch"] for r in rows]
    for mine, theirs in zip(epochs, rows, strict=True):
        assert float(mine["val_loss"]) == pytest.approx(theirs["val_loss"], rel=1e-12)
        assert int(mine["flops"]) == theirs["flops"]
    steps = _csv(run / "csv" / "steps.csv")
    assert [int(s["global_step"]) for s in steps] == list(range(2, summary(run)["global_step"] + 1, 2))
    assert all(float(s["lr"]) > 0 and float(s["train_loss"]) > 0 for s in steps)


def test_a_resume_and_a_rollback_leave_the_csv_as_the_run_stands(tmp_path: Path) -> None:
    run = tmp_path / "r"
    items = [*PLAIN, 'telemetry.loggers=["csv"]', "telemetry.log_every_steps=1"]
    assert train(run, *items, extra=["--fault", "nan_loss@2:3"]).exit_code == 0
    steps = [int(s["global_step"]) for s in _csv(run / "csv" / "steps.csv")]
    assert steps == sorted(set(steps)) == list(range(1, summary(run)["global_step"] + 1))  # replays replaced
    assert [int(r["epoch"]) for r in _csv(run / "csv" / "epochs.csv")] == [1, 2, 3]


def test_mlflow_gets_params_epoch_metrics_steps_and_the_outcome(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "runs" / "r"
    run.parent.mkdir()
    result = train(run, *PLAIN, 'telemetry.loggers=["mlflow"]', "telemetry.log_every_steps=3")
    assert result.exit_code == 0, out(result)
    client = MlflowClient(tracking_uri=(tmp_path / "runs" / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("esper")
    (found,) = client.search_runs([experiment.experiment_id])
    assert found.info.status == "FINISHED" and found.data.tags["esper.run_id"] == summary(run)["run_id"]
    assert found.data.params["trainer.epochs"] == "3" and found.data.params["data.task"] == "synthetic"
    history = client.get_metric_history(found.info.run_id, "val_loss")
    assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
        [(r["epoch"], pytest.approx(r["val_loss"], rel=1e-12)) for r in metrics(run)]
    assert [m.step for m in client.get_metric_history(found.info.run_id, "step/train_loss")] == [3, 6, 9, 12, 15, 18]
    # a resumed session continues the same MLflow run
    # the loggers may change on a resume without --allow-config-change: they change what is reported, not trained
    resumed = train(run, *PLAIN, 'telemetry.loggers=["mlflow", "csv"]', "trainer.epochs=4",
                    extra=["--resume", str(run), "--allow-config-change", "trainer.epochs"])
    assert resumed.exit_code == 0, out(resumed)
    (again,) = client.search_runs([experiment.experiment_id])
    assert again.info.run_id == found.info.run_id and again.info.status == "FINISHED"
    assert len(client.get_metric_history(found.info.run_id, "val_loss")) == 4
    assert len(client.get_metric_history(found.info.run_id, "step/train_loss")) == 6  # no steps logged on resume
    assert [int(r["epoch"]) for r in _csv(run / "csv" / "epochs.csv")] == [4]  # csv came in at the resume


def test_a_logger_twice_or_unknown_is_exit_3(tmp_path: Path) -> None:
    for bad in ('telemetry.loggers=["csv", "csv"]', 'telemetry.loggers=["wandb"]'):
        result = train(tmp_path / "r", *PLAIN, bad)
        assert result.exit_code == ExitCode.CONFIG and "telemetry.loggers" in out(result)
        assert not (tmp_path / "r").exists()


def test_mlflow_not_installed_is_exit_3_before_anything_is_written(tmp_path: Path) -> None:
    run = tmp_path / "r"
    done = subprocess.run([str(ESPER), "train", "--quiet", "--run-dir", str(run),
                           *sets(*PLAIN, 'telemetry.loggers=["mlflow"]')],
                          env=without_package(tmp_path, "mlflow"), capture_output=True, text=True)
    assert done.returncode == ExitCode.CONFIG, done.stdout + done.stderr
    assert "'mlflow' needs the optional 'mlflow' package" in done.stderr
    assert "pip install 'esper[mlflow]'" in done.stderr and "Traceback" not in done.stderr
    assert not run.exists()
