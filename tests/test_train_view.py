"""The default `esper train` view (Rich progress + live slot table), not just --quiet/--json."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from esper.cli.main import app
from esper.cli.train import RichReporter

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
    result = CliRunner().invoke(app, ["train", *SYNTH, "--run-dir", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert "COMPLETED" in result.stdout
    assert (tmp_path / "run" / "summary.json").is_file()
