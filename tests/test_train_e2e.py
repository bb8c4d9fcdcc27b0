"""End to end: the installed `esper` console script trains and writes the run directory of SPEC §8."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from esper.core.checkpoint import latest_checkpoint, verify_checkpoint
from esper.core.config import from_toml_text
from esper.core.records.event_log import read_events

REPO = Path(__file__).resolve().parents[1]
ESPER = Path(sys.executable).parent / "esper"
SUMMARY_KEYS = {"run_id", "status", "exit_code", "epochs_completed", "final", "seeds", "emergencies", "rollbacks",
                "checkpoint"}
CHAIN = ["GERMINATED", "TRAINING", "BLENDING", "SHADOWING", "PROBATIONARY", "FOSSILIZED"]

TINY = """\
[run]
seed = 3
threads = 1

[data]
task = "synthetic"
synthetic_samples = 128
batch_size = 32

[host]
hidden = [6, 6]

[trainer]
epochs = 3

[controller]
plateau_min_delta = 0.6
"""

pytestmark = pytest.mark.slow


def esper(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ESPER), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          check=False)


def tiny_config(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def check_run_dir(run_dir: Path, epochs: int) -> dict[str, Any]:
    """Every file of SPEC §8 is there and consistent; returns summary.json."""
    cfg = from_toml_text((run_dir / "config.toml").read_text())  # the resolved config, valid on its own
    assert cfg.trainer.epochs == epochs

    events = read_events(run_dir / "events.jsonl")
    assert events.problems == []
    names = [r["event"] for r in events.records]
    assert names[0] == "run.started" and "run.finished" in names
    assert [r["seq"] for r in events.records] == sorted(r["seq"] for r in events.records)

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, epochs + 1))

    latest = latest_checkpoint(run_dir / "checkpoints")
    assert latest is not None and latest.name == (run_dir / "checkpoints" / "latest").read_text().strip()
    assert verify_checkpoint(latest).ok

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.keys() >= SUMMARY_KEYS
    assert summary["status"] == "COMPLETED" and summary["exit_code"] == 0
    assert summary["epochs_completed"] == epochs
    assert summary["final"]["val_loss"] == rows[-1]["val_loss"]
    assert summary["final"]["val_accuracy"] == rows[-1]["val_accuracy"]
    assert summary["final"]["params"] == rows[-1]["params"]
    assert Path(summary["checkpoint"]) == latest
    assert [s["slot"] for s in summary["seeds"]] == [s.name for s in cfg.seeds.slots]
    for seed in summary["seeds"]:
        assert {"stage", "blueprint", "history"} <= seed.keys()
    return summary


def test_quiet_train_writes_the_run_directory(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = esper("train", "--quiet", "--config", str(tiny_config(tmp_path)), "--run-dir", str(run_dir),
                 cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[1] for ln in lines if ln.startswith("epoch ")] == ["1/3", "2/3", "3/3"]
    assert any(ln.startswith("COMPLETED") for ln in lines)
    assert "\x1b[" not in proc.stdout  # plain lines for logs: no terminal control sequences
    summary = check_run_dir(run_dir, 3)
    assert f"run directory: {run_dir}" in proc.stdout
    assert summary["run_dir"] == str(run_dir)
    assert not (tmp_path / "runs").exists()  # --run-dir wins over run.output_dir


def test_json_stdout_is_exactly_the_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = esper("train", "--json", "--config", str(tiny_config(tmp_path)), "--run-dir", str(run_dir),
                 "--set", "trainer.epochs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # the whole of stdout is one JSON document
    assert doc == check_run_dir(run_dir, 2)
    assert tomllib.loads((run_dir / "config.toml").read_text())["trainer"]["epochs"] == 2


def test_default_config_grows_a_seed_to_fossilized(tmp_path: Path) -> None:
    """The shipped esper.toml (MNIST-1D, cnn host, conv seeds), cut to its first 12 epochs (the seeds fossilize
    by epoch 10 at run.seed 42): at least one conv seed goes DORMANT -> ... -> FOSSILIZED in one unbroken run of
    the lifecycle, visible in both events.jsonl and summary.json."""
    run_dir = tmp_path / "run"
    proc = esper("train", "--json", "--run-dir", str(run_dir), "--set", "trainer.epochs=12", cwd=REPO, timeout=400)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary == check_run_dir(run_dir, summary["epochs_completed"])

    assert summary["task"]["name"] == "mnist1d"
    fossilized = [s for s in summary["seeds"] if s["stage"] == "FOSSILIZED"]
    assert {s["blueprint"] for s in fossilized} == {"conv_block"}
    assert fossilized, [(s["slot"], [h["dest"] for h in s["history"]]) for s in summary["seeds"]]
    for seed in fossilized:
        history = seed["history"]
        # the last germination starts from DORMANT and climbs every stage in order to FOSSILIZED
        start = max(i for i, h in enumerate(history) if h["source"] == "DORMANT")
        tail = history[start:]
        assert [h["source"] for h in tail] == ["DORMANT", *CHAIN[:-1]]
        assert [h["dest"] for h in tail] == CHAIN
        assert [h["gate"]["gate"] for h in tail if h["gate"]] == ["G0", "G1", "G2", "G3", "G4"]

    records = read_events(run_dir / "events.jsonl").records
    for seed in fossilized:
        dests = [r["attributes"]["transition"]["dest"] for r in records
                 if r["event"] == "seed.transition" and r["attributes"]["slot"] == seed["slot"]]
        assert dests == [h["dest"] for h in seed["history"]]
        assert dests[-len(CHAIN):] == CHAIN
        fossilize_cmds = [r for r in records if r["event"] == "command.accepted"
                          and r["attributes"]["command"]["kind"] == "fossilize"
                          and r["attributes"]["command"]["slot"] == seed["slot"]]
        assert len(fossilize_cmds) == 1
    # the fossilized seed's parameters are counted in the model
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["params"] > rows[0]["params"]
