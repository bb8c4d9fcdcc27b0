"""The default `esper train` view (Rich progress + live slot table), not just --quiet/--json."""

from __future__ import annotations

import io
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_TOML, ESPER, GROWING, UNHURRIED, out, sets, train
from rich.console import Console
from typer.testing import CliRunner

from esper.app.session import TrainSession
from esper.cli.main import app
from esper.cli.train import RichReporter
from esper.core import config as config_mod

SYNTH = ["--set", "data.task=synthetic", "--set", "data.synthetic_samples=128", "--set", "trainer.epochs=2",
         "--set", "controller.isolation=inline"]


def test_rich_reporter_renders_every_epoch_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    slots = [{"slot": "s1", "layer": "hidden1", "seed_id": "s1-1", "blueprint": "lowrank", "stage": "BLENDING",
              "alpha": 0.5, "epochs_in_stage": 1}]
    row = {"epoch": 1, "train_loss": 0.5, "train_accuracy": 0.8, "val_loss": 0.6, "val_accuracy": 0.75, "params": 10,
           "seeds_by_stage": {"BLENDING": 1}, "emergency_level": "NOMINAL"}
    with RichReporter(console, epochs=2) as reporter:
        for epoch in (1, 2):
            reporter.epoch_start(epoch, steps=3)
            for _ in range(3):
                reporter.step(0.5)
            reporter.epoch_end({**row, "epoch": epoch}, slots)
    text = out.getvalue()
    assert "epoch 2/2" in text and "BLENDING" in text and "lowrank" in text


def test_default_view_run_completes(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["train", "--config", str(BASE_TOML), *SYNTH, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "COMPLETED" in result.stdout
    assert (tmp_path / "run" / "summary.json").is_file()


def test_the_bar_shows_the_whole_run_position_and_an_eta() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160)
    with RichReporter(console, epochs=2, title="run r") as reporter:
        reporter.epoch_start(1, steps=3)
        for _ in range(3):
            reporter.step(0.5)
        reporter.view.live.refresh()
        text = out.getvalue()
    assert "run r" in text and "step 3/6" in text and "ETA 0:00:00" in text and "loss 0.5000" in text


class _Steps:
    """Records what the trainer reports per step and per epoch."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.last_of_epoch: list[float] = []
        self.rows: list[dict[str, Any]] = []

    def epoch_start(self, epoch: int, steps: int) -> None:
        self.steps = []

    def step(self, loss: float) -> None:
        self.steps.append(loss)

    def epoch_end(self, row: dict[str, Any], slots: list[dict[str, Any]]) -> None:
        self.last_of_epoch.append(self.steps[-1])
        self.rows.append(row)

    def notice(self, text: str) -> None:
        return None


def test_the_loss_shown_per_step_is_the_epochs_running_mean(tmp_path: Path) -> None:
    cfg = config_mod.load(BASE_TOML, [*GROWING, "trainer.epochs=3", "controller.isolation=inline",
                                         "data.batch_size=48"]).config
    seen = _Steps()
    TrainSession.prepare(cfg, run_dir=tmp_path / "run").run(seen)
    # the last value shown in an epoch is the epoch's mean (the row's train_loss), not its last (short) batch's
    assert seen.last_of_epoch == [r["train_loss"] for r in seen.rows]


@pytest.mark.slow
def test_the_live_view_on_a_log_ends_its_line_before_the_summary(tmp_path: Path) -> None:
    args = [str(ESPER), "--config", str(BASE_TOML), "train", *sets(*GROWING, "trainer.epochs=2",
                                                                        "controller.isolation=inline")]
    split = subprocess.run([*args, "--run-dir", str(tmp_path / "a")], capture_output=True, text=True)
    assert split.returncode == 0, split.stderr
    assert split.stderr.endswith("\n") and split.stdout.startswith("COMPLETED run ")
    merged = subprocess.run([*args, "--run-dir", str(tmp_path / "b")], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert merged.returncode == 0
    assert any(line.startswith("COMPLETED run ") for line in merged.stdout.splitlines()), merged.stdout


@pytest.mark.parametrize("shell, marker, env, parse", [
    ("bash", "_ESPER_COMPLETE=complete_bash", {"COMP_WORDS": "esper pl", "COMP_CWORD": "1"}, str.split),
    ("zsh", "#compdef esper", {"_TYPER_COMPLETE_ARGS": "esper pl"},
     lambda out: re.findall(r'"(\w+)":', out)),
    ("fish", "complete --command esper",
     {"_TYPER_COMPLETE_ARGS": "esper pl", "_TYPER_COMPLETE_FISH_ACTION": "get-args"},
     lambda out: [line.split("\t")[0] for line in out.splitlines()]),
])
def test_completion_prints_each_shells_own_script_and_completes_commands(
        shell: str, marker: str, env: dict[str, str], parse: Any) -> None:
    """Issue 27: `esper --show-completion zsh` printed the bash script; `esper completion SHELL` is per shell."""
    shown = subprocess.run([str(ESPER), "completion", shell], capture_output=True, text=True)
    assert shown.returncode == 0 and marker in shown.stdout, shown.stderr
    done = subprocess.run([str(ESPER)], capture_output=True, text=True,
                          env={**os.environ, "_ESPER_COMPLETE": f"complete_{shell}", **env})
    assert done.returncode == 0 and parse(done.stdout) == ["plot"], done.stdout


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    done = subprocess.run([str(ESPER), "completion", "tcsh"], capture_output=True, text=True)
    assert done.returncode == 2 and "'zsh'" in done.stderr and not done.stdout


def test_quiet_output_says_when_a_rollback_replays_an_epoch(tmp_path: Path) -> None:
    """Issue 27: after a rollback `--quiet` repeated `epoch 2/3` with no line saying why."""
    r = train(tmp_path / "run", 'data.task="synthetic"', "trainer.epochs=3", *UNHURRIED,
              extra=["--fault", "nan_loss@2:1"])
    assert r.exit_code == 0, out(r)
    lines = r.stdout.splitlines()
    [notice] = [i for i, line in enumerate(lines) if line.startswith("rollback (fast tier, ")]
    assert "after non_finite_loss: epoch 2 is replayed from step 0, leaving out batch 1 of epoch 2" in lines[notice]
    assert lines[notice - 1].startswith("epoch 1/3") and lines[notice + 1].startswith("epoch 2/3")
