"""Checkpoints written by earlier Esper verify and resume (format v1 is a contract, C-1).

``data/checkpoint-fdf50af`` is the epoch-3 checkpoint of a small synthetic run written by commit fdf50af (before
Tolaria was split into components): a seed BLENDING, one TRAINING, momentum for both, the controller mid-window.
Resumed by this code it must continue exactly as this code continues from its own checkpoints, and land where a
straight run of the same config lands (up to the rounding of the CPU that computed the old epochs).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import (
    WALL_CLOCK_FIELDS,
    assert_same_tensors,
    events,
    latest,
    metrics,
    metrics_without_wall_clock,
    out,
    summary,
    tensors,
)
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


def resume(run: Path, epochs: int) -> None:
    r = esper_own_config("train", "--quiet", "--resume", str(run), "--set", f"trainer.epochs={epochs}",
                         "--allow-config-change", "trainer.epochs")
    assert r.exit_code == 0, out(r)
    assert summary(run)["status"] == "COMPLETED" and summary(run)["epochs_completed"] == epochs


def lifecycles(run: Path) -> list[tuple[object, ...]]:
    """Each seed's stage, alpha and every transition with its reason (not the wall-clock stamps)."""
    return [(s["slot"], s["stage"], s["blueprint"], s["seed_id"], s["alpha"],
             [(h["source"], h["dest"], h["trigger"], h["reason"]) for h in s["history"]])
            for s in summary(run)["seeds"]]


def final_state(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {stem: tensors(latest(run), stem) for stem in ("model", "optimizer", "rng")}


@pytest.mark.slow
def test_the_old_checkpoint_resumes_exactly_as_this_code_resumes_its_own(tmp_path: Path) -> None:
    """Bit for bit against this machine's own arithmetic: resumed 3 -> 5 in one go equals 3 -> 4 then a resume of
    this code's epoch-4 checkpoint -> 5. The old file's epochs 1-3 were computed on another CPU, whose floats
    round differently (AVX2 vs AVX-512), so they are never compared bit for bit with a run made here."""
    once, twice = tmp_path / "a" / "old-run", tmp_path / "b" / "old-run"
    old_run(tmp_path / "a")
    old_run(tmp_path / "b")
    resume(once, 5)
    resume(twice, 4)
    resume(twice, 5)
    assert "resumed" in [e["event"] for e in events(once)]
    assert latest(once).name == latest(twice).name == "epoch-0005"
    for stem, state in final_state(once).items():
        assert_same_tensors(state, final_state(twice)[stem])
    assert metrics_without_wall_clock(once) == metrics_without_wall_clock(twice)
    assert lifecycles(once) == lifecycles(twice)
    # rows 1-3 are the old checkpoint's own history, read whole and kept to the digit
    old_history = load_checkpoint(OLD).manifest.history
    assert [{k: v for k, v in row.model_dump().items() if k not in WALL_CLOCK_FIELDS} for row in old_history] == \
        metrics_without_wall_clock(once)[:3]


@pytest.mark.slow
def test_the_old_checkpoint_continues_the_run_it_was_cut_from(tmp_path: Path) -> None:
    """Everything the old file holds is taken up (momentum, seed stages, the controller's window, the RNG): its
    resume lands where this code's straight run of the same config lands, up to the rounding of the CPU that
    computed the old epochs (a dropped part, e.g. momentum, moves the weights by orders of magnitude more)."""
    run = old_run(tmp_path)
    resume(run, 5)
    config = tmp_path / "config.toml"
    config.write_text(load_checkpoint(OLD).manifest.config_toml or "")
    straight = tmp_path / "straight"
    r = esper_own_config("--config", str(config), "train", "--quiet", "--run-dir", str(straight),
                         "--set", "trainer.epochs=5")
    assert r.exit_code == 0, out(r)
    assert [s["stage"] for s in summary(run)["seeds"]] == [s["stage"] for s in summary(straight)["seeds"]]
    resumed, fresh = final_state(run), final_state(straight)
    for stem in ("model", "optimizer"):
        assert sorted(resumed[stem]) == sorted(fresh[stem])
        for key, value in resumed[stem].items():
            torch.testing.assert_close(value, fresh[stem][key], rtol=1e-3, atol=1e-5, msg=f"{stem} {key}")
    assert [row["epoch"] for row in metrics(run)] == [row["epoch"] for row in metrics(straight)] == [1, 2, 3, 4, 5]
