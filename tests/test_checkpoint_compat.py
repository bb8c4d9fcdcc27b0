"""Checkpoints written by earlier Esper verify and resume (format v1 is a contract, C-1).

``data/checkpoint-fdf50af`` is the epoch-3 checkpoint of a small synthetic run written by commit fdf50af (before
Tolaria was split into components): a seed BLENDING, one TRAINING, momentum for both, the controller mid-window.
Resumed by this code to 5 epochs it must give exactly what this code gives training the same config straight.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import assert_same_tensors, events, latest, metrics_without_wall_clock, out, summary, tensors
from typer.testing import CliRunner, Result

from esper.cli.main import app
from esper.core.checkpoint import load_checkpoint, verify_checkpoint
from esper.core.config import ENV_VAR

OLD = Path(__file__).parent / "data" / "checkpoint-fdf50af"


def esper_own_config(*args: str) -> Result:
    """`esper` with no config file at all: a plain resume takes the checkpoint's own config."""
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "250", ENV_VAR: None})


def old_run(tmp_path: Path) -> Path:
    run = tmp_path / "old-run"
    shutil.copytree(OLD, run / "checkpoints" / "epoch-0003")
    (run / "checkpoints" / "latest").write_text("epoch-0003\n")
    return run


def test_the_old_checkpoint_verifies_and_loads_through_the_manifest_model(tmp_path: Path) -> None:
    run = old_run(tmp_path)
    assert verify_checkpoint(run).ok
    r = esper_own_config("inspect-checkpoint", str(run), "--verify", "--json")
    assert r.exit_code == 0, out(r)
    loaded = load_checkpoint(run)
    m = loaded.manifest
    assert (m.run_id, m.epoch, m.global_step, m.reason) == ("compat-fdf50af", 3, 9, "periodic")
    assert [(s.slot, s.stage) for s in m.seeds or []] == [("s1", "BLENDING"), ("s2", "TRAINING")]
    assert set(loaded.tensors) == {"model", "optimizer", "rng"}
    assert any(k.startswith("seed.s1.") for k in loaded.tensors["model"])


@pytest.mark.slow
def test_the_old_checkpoint_resumes_bit_identically_to_a_straight_run(tmp_path: Path) -> None:
    run = old_run(tmp_path)
    r = esper_own_config("train", "--quiet", "--resume", str(run), "--set", "trainer.epochs=5",
                         "--allow-config-change", "trainer.epochs")
    assert r.exit_code == 0, out(r)
    assert summary(run)["status"] == "COMPLETED" and summary(run)["epochs_completed"] == 5
    assert "resumed" in [e["event"] for e in events(run)]

    config = tmp_path / "config.toml"
    config.write_text(load_checkpoint(OLD).manifest.config_toml or "")
    straight = tmp_path / "straight"
    r = esper_own_config("--config", str(config), "train", "--quiet", "--run-dir", str(straight),
                         "--set", "trainer.epochs=5")
    assert r.exit_code == 0, out(r)

    assert latest(run).name == latest(straight).name == "epoch-0005"
    for stem in ("model", "optimizer", "rng"):
        assert_same_tensors(tensors(latest(run), stem), tensors(latest(straight), stem))
    # rows 1-3 come from the old code's checkpoint history, rows 4-5 from the resume: all equal this code's
    assert metrics_without_wall_clock(run) == metrics_without_wall_clock(straight)
    assert [s["stage"] for s in summary(run)["seeds"]] == [s["stage"] for s in summary(straight)["seeds"]]
