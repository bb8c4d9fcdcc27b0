"""T-13: a bounded profiler window whose failures are reported, never fatal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from esper.core import config as cfgmod
from esper.core.errors import ConfigError
from esper.core.records.rundir import RunDir
from esper.core.tolaria.profiler import ProfilerWindow
from esper.core.tolaria.trainer import Trainer

TINY = ["data.task=synthetic", "data.synthetic_samples=128", "trainer.epochs=1", "seeds.enabled=false"]


def _run(tmp_path: Path, *extra: str) -> tuple[dict, list[dict]]:
    cfg = cfgmod.from_dict({}, [*TINY, *extra])
    rd = RunDir.create(cfg, tmp_path / "run")
    summary = Trainer(cfg, rd).run()
    events = [json.loads(line) for line in rd.events.read_text().splitlines()]
    return summary, events


def test_enabled_without_dir_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="profiler"):
        cfgmod.from_dict({}, ["trainer.profiler.enabled=true"])


def test_window_writes_one_trace_into_the_run_directory(tmp_path: Path) -> None:
    summary, events = _run(tmp_path, "trainer.profiler.enabled=true", "trainer.profiler.dir=prof",
                           "trainer.profiler.wait=0", "trainer.profiler.warmup=1", "trainer.profiler.active=2")
    assert summary["status"] == "COMPLETED"
    traces = list((tmp_path / "run" / "prof").glob("trace-*.json"))
    assert len(traces) == 1, "the window is bounded: exactly one trace for one window"
    assert json.loads(traces[0].read_text())["traceEvents"], "the trace holds recorded events"
    assert [e["event"] for e in events if e["event"].startswith("profiler.")] == ["profiler.started",
                                                                                 "profiler.exported"]


def test_export_failure_is_a_warning_and_training_completes(tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self: object, path: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("torch.profiler.profile.export_chrome_trace", broken)
    summary, events = _run(tmp_path, "trainer.profiler.enabled=true", "trainer.profiler.dir=prof",
                           "trainer.profiler.wait=0", "trainer.profiler.warmup=0", "trainer.profiler.active=1")
    assert summary["status"] == "COMPLETED" and summary["exit_code"] == 0
    failed = [e for e in events if e["event"] == "profiler.export_failed"]
    assert len(failed) == 1 and failed[0]["level"] == "WARNING" and "No space" in failed[0]["attributes"]["error"]
    assert summary["epochs_completed"] == 1, "the epoch was not re-run"


def test_unwritable_dir_is_a_config_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    pcfg = cfgmod.ProfilerConfig(enabled=True, dir=str(blocker / "sub"))
    with pytest.raises(ConfigError, match="trainer.profiler.dir"):
        ProfilerWindow(pcfg, tmp_path, lambda *a, **k: None)
