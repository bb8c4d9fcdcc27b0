"""`esper plot` (V-1): the PNG is decoded and looked at — its size, that it is not blank, and that the colours of
the seed stages the run went through (from the seed table) and of its emergency level are really drawn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import GROWING, esper, events, out, train
from matplotlib.image import imread

from esper.app.views.plot import DPI, WIDTH_IN, level_colour, stage_colour
from esper.core.errors import ExitCode


def _pixels(png: Path) -> np.ndarray:
    img = imread(str(png))
    assert img.dtype == np.float32 and img.shape[2] in (3, 4)
    return np.round(img[:, :, :3] * 255).astype(np.int16)


def _count(pixels: np.ndarray, rgba: tuple[float, ...], tol: int = 0) -> int:
    target = np.round(np.array(rgba[:3]) * 255).astype(np.int16)
    return int((np.abs(pixels - target).max(axis=2) <= tol).sum())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("plot")
    grown, host = base / "grown", base / "host"
    r = train(grown, *GROWING, "trainer.epochs=12", extra=["--fault", "nan_loss@6:1"])
    assert r.exit_code == 0, out(r)
    r = train(host, *GROWING, "trainer.epochs=12", "seeds.enabled=false")
    assert r.exit_code == 0, out(r)
    return grown, host


@pytest.mark.slow
def test_plot_of_one_run_shows_its_seed_stages_and_its_emergency(runs: tuple[Path, Path]) -> None:
    grown, _ = runs
    result = esper("plot", str(grown), "--json")
    assert result.exit_code == 0, out(result)
    doc = json.loads(result.stdout)
    png = grown / "plot.png"
    assert doc["output"] == str(png) and png.is_file()
    pixels = _pixels(png)
    assert pixels.shape[:2] == (9 * DPI, int(WIDTH_IN * DPI))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank: curves, text, bands
    # every stage the run's own events name is drawn as a band in the table's colour for it
    went_through = {"DORMANT"} | {e["attributes"]["transition"]["dest"] for e in events(grown, "seed.transition")}
    assert {"TRAINING", "BLENDING", "FOSSILIZED"} <= went_through
    assert set(doc["stages"]) == went_through
    for stage in went_through:
        assert _count(pixels, stage_colour(stage)) > 20, stage
    assert _count(pixels, stage_colour("CULLED")) == 0  # a stage the run never reached is not drawn
    assert [e["attributes"]["to_level"] for e in events(grown, "emergency.level")][0] == "ELEVATED"
    assert _count(pixels, level_colour("ELEVATED"), tol=3) > 20  # the emergency marker, in its level's colour
    assert "emergency" in doc["markers"] and "rollback" in doc["markers"] and "checkpoint" in doc["markers"]


@pytest.mark.slow
def test_several_runs_share_one_figure_with_labels_and_need_an_output(runs: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    grown, host = runs
    target = tmp_path / "compare.png"
    result = esper("plot", str(grown), str(host), "--label", "grown", "--label", "host alone", "-o", str(target))
    assert result.exit_code == 0, out(result)
    assert target.is_file() and f"wrote {target}" in result.output
    assert _pixels(target).shape[:2] == (9 * DPI, int(WIDTH_IN * DPI))
    refused = esper("plot", str(grown), str(host))
    assert refused.exit_code == ExitCode.USAGE and "-o FILE.png" in refused.output
    mismatch = esper("plot", str(grown), str(host), "--label", "one", "-o", str(target))
    assert mismatch.exit_code == ExitCode.USAGE and "1 --label for 2 runs" in mismatch.output


def _hand_run(run: Path, rows: list[dict[str, object]], events_text: str = "") -> Path:
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "events.jsonl").write_text(events_text)
    return run


def test_usage_errors_are_exit_2_with_a_message(tmp_path: Path) -> None:
    assert esper("plot", str(tmp_path)).exit_code == ExitCode.USAGE  # not a run directory
    run = _hand_run(tmp_path / "r", [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.5,
                                      "params": 10}])
    missing_dir = esper("plot", str(run), "-o", str(tmp_path / "nope" / "x.png"))
    assert missing_dir.exit_code == ExitCode.USAGE and "no such directory" in missing_dir.output
    assert esper("plot", str(run), "-o", str(tmp_path / "x.jpg")).exit_code == ExitCode.USAGE
    empty = _hand_run(tmp_path / "empty", [])
    nothing = esper("plot", str(empty))
    assert nothing.exit_code == ExitCode.USAGE and "nothing to plot" in nothing.output


def test_a_damaged_run_directory_is_plotted_from_what_is_whole_and_the_damage_reported(tmp_path: Path) -> None:
    rows = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "val_accuracy": 0.4, "params": 10},
            {"epoch": "two", "val_loss": [1]}, {"epoch": 3, "train_loss": "nan", "val_loss": None, "params": True},
            {"epoch": 4, "train_loss": 0.5, "val_loss": 0.6, "val_accuracy": 0.7, "params": 20}]
    hostile = ('{"event": "seed.transition", "epoch": 2, "attributes": {"slot": "[red]s1", "transition": '
               '{"source": "DORMANT", "dest": "GERMINATED"}}}\n'
               '{"event": "seed.transition", "epoch": "x", "attributes": {"slot": 7, "transition": []}}\n'
               '{"event": "emergency.level", "epoch": 3, "attributes": {"to_level": "BOGUS"}}\n'
               'garbage\n{"event": "epoch.completed", "attributes": {"slots": [1, {"slot": null}]}}\n{"torn": ')
    run = _hand_run(tmp_path / "r", rows, hostile)
    result = esper("plot", str(run))
    assert result.exit_code == 0, out(result)
    assert "events.jsonl line 4" in result.output and "line 6 (last, no newline: torn write?)" in result.output
    pixels = _pixels(run / "plot.png")
    assert _count(pixels, stage_colour("GERMINATED")) > 100 and _count(pixels, stage_colour("DORMANT")) > 100
