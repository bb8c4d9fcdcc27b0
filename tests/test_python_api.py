"""Issue 27: Esper from Python, no subprocess: ``esper.train`` runs a session as ``esper train --quiet`` does and
returns its summary; a resume continues it bit for bit; what keeps a run from starting raises a typed error."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import BASE_TOML, UNHURRIED, assert_same_tensors, latest, summary, tensors, train

import esper
from esper.core.errors import ConfigError, ExitCode, UsageError

JOB = ['data.task="synthetic"', *UNHURRIED]


def test_train_returns_the_summary_the_run_directory_holds_and_resumes_exactly(tmp_path: Path) -> None:
    run, straight = tmp_path / "api", tmp_path / "cli"
    done = esper.train(BASE_TOML, overrides=[*JOB, "trainer.epochs=2"], run_dir=run)
    assert done["status"] == "COMPLETED" and done["exit_code"] == 0 and done == summary(run)
    more = esper.train(resume=run, overrides=["trainer.epochs=4"], allow_config_change=["trainer.epochs"])
    assert more["epochs_completed"] == 4 and more["run_id"] == done["run_id"]
    assert train(straight, *JOB, "trainer.epochs=4").exit_code == 0
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(run), stem), tensors(latest(straight), stem))


def test_a_dict_config_and_the_typed_errors(tmp_path: Path) -> None:
    done = esper.train({"data": {"task": "synthetic"}, "trainer": {"epochs": 1}}, overrides=UNHURRIED,
                       run_dir=tmp_path / "run")
    assert done["epochs_completed"] == 1
    with pytest.raises(ConfigError, match="trainer.epochz") as bad:
        esper.train({"trainer": {"epochz": 1}}, run_dir=tmp_path / "bad")
    assert bad.value.exit_code == ExitCode.CONFIG and not (tmp_path / "bad").exists()
    with pytest.raises(UsageError, match="it is not empty"):
        esper.train({"data": {"task": "synthetic"}}, run_dir=tmp_path / "run")
