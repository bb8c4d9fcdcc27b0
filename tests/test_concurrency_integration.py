"""Concurrency you can cancel, end to end (SPEC T-7; issue 6): a hung controller is abandoned and the run
reaches CONSERVATIVE and completes with no process or thread of Esper's left behind; a prefetched blueprint
attaches from the cache; a blueprint that cannot load makes its germinate command rejected with the reason."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import BASE_TOML, ESPER, make_config, session_pids, wait_until
from conftest import events as run_events
from torch import nn

from esper.app.drill import drill_config, run_drill
from esper.core import config as config_mod
from esper.core.config import EsperConfig
from esper.core.kasmina.blueprints import BlueprintRegistry
from esper.core.kasmina.kinds import SlotShape
from esper.core.records.rundir import RunDir
from esper.core.tolaria.trainer import Trainer

# The drill's growing setup (a germination at the end of epoch 2), wall-clock budgets lifted so a busy box
# cannot cull seeds or raise NOTICEs, and the controller inline: these tests are about blueprint loading.
GROWING: dict[str, Any] = {
    "data": {"task": "synthetic", "synthetic_samples": 256},
    "trainer": {"epochs": 3},
    "controller": {"isolation": "inline", "timeout_ms": 120000, "warmup_epochs": 0, "plateau_window": 1,
                   "plateau_min_delta": 1.0, "risk": {"max_step_latency_ms": 600000.0}},
    "seeds": {"min_training_epochs": 1, "g2_min_improvement": 0.0, "max_step_latency_ms": 600000.0},
    "emergency": {"slow_step_ms": 600000.0},
}


def growing(*overrides: str) -> EsperConfig:
    return make_config(*overrides, base=GROWING)


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "<gone>"


# ------------------------------------------------------------------------------ hung controller, no leftovers


@pytest.mark.slow
def test_controller_timeout_drill_as_a_process_completes_and_leaves_no_child_behind(tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [str(ESPER), "--config", str(BASE_TOML), "simulate-emergency", "--fault", "controller_timeout",
           "--synthetic", "--run-dir", str(run), "--json"]
    stdout_path, stderr_path = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, start_new_session=True,
                                env={**os.environ, "COLUMNS": "250"})
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None:
            assert time.monotonic() < deadline, "the drill did not finish in 300 s"
            for pid in session_pids(proc.pid):
                if pid != proc.pid and "spawn_main" in cmdline(pid):
                    workers.add(pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.05)  # sample the workers until the drill ends (and not a moment longer)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = session_pids(proc.pid)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{stdout_path.read_text()}\n{stderr_path.read_text()}"
    doc = json.loads(stdout_path.read_text())
    assert doc["matched"] is True, doc["mismatches"]
    assert (doc["level_reached"], doc["final_state"]) == ("CONSERVATIVE", "COMPLETED")
    # the hung worker was killed and a fresh one answered the next decision
    assert len(workers) >= 2, f"saw controller workers {sorted(workers)}; expected the hung one and its replacement"
    events = run_events(run)
    [timeout] = [e for e in events if e["event"] == "controller_timeout"]
    later = [e for e in events if e["event"] == "controller_decision" and e["seq"] > timeout["seq"]]
    assert later and later[0]["attributes"]["restarts"] == 1 and later[0]["attributes"]["timeout"] is False
    # nothing of the run outlived it; a process still exiting gets a short, bounded grace
    wait_until(lambda: not session_pids(proc.pid), "the drill's processes to go: " + "; ".join(
        f"{p}: {cmdline(p)}" for p in left), 3.0)
    assert not [p for p in workers if Path(f"/proc/{p}").exists() and "spawn_main" in cmdline(p)]


def esper_threads() -> set[threading.Thread]:
    return set(threading.enumerate())


@pytest.mark.slow
def test_controller_timeout_drill_in_process_leaves_no_thread_or_child_process(tmp_path: Path) -> None:
    cfg = drill_config(config_mod.load(BASE_TOML).config, [], synthetic=True)
    assert cfg.controller.isolation == "process"
    assert multiprocessing.active_children() == []
    before = esper_threads()
    doc = run_drill(cfg, fault="controller_timeout", level=None, at=None, run_dir=tmp_path / "run", synthetic=True)
    children = multiprocessing.active_children()
    new_threads = esper_threads() - before
    assert doc["matched"] is True, doc["mismatches"]
    assert doc["level_reached"] == "CONSERVATIVE" and doc["final_state"] == "COMPLETED"
    assert children == [], f"controller workers still alive after the run: {children}"
    assert not new_threads, f"threads still alive after the run: {sorted(t.name for t in new_threads)}"


# ---------------------------------------------------------------------------------- blueprint load manager


@pytest.mark.slow
def test_a_prefetched_blueprint_attaches_from_the_cache_without_a_load(tmp_path: Path) -> None:
    cfg = growing()
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"), controller_factory=None)
    try:
        tr.build()
        loader = tr.parts.loader
        assert loader is not None
        shapes = {s.shape for s in tr.parts.kasmina.slots.values()}
        wanted = [(bp, shape) for bp in cfg.seeds.blueprints for shape in shapes]
        wait_until(lambda: all(loader.is_ready(bp, shape) for bp, shape in wanted), "the build-time prefetch")
        builds = loader.stats().lifetime.builds
        assert builds == len(wanted)  # one load per (blueprint, slot shape), de-duplicated
        loader.reset_stats()
        slot = tr.parts.kasmina.slots["s1"]
        tr.parts.kasmina.germinate("s1", "lowrank", "test: prefetched")
        window = loader.stats().window
        assert (window.gets, window.hits, window.misses, window.builds) == (1, 1, 0, 0)
        assert slot.stage == "GERMINATED" and slot.blueprint == "lowrank"
        assert isinstance(slot.module, nn.Module)
        # a private copy: training the seed cannot touch the cached template or the next germination's module
        again = loader.get("lowrank", slot.shape)
        assert {id(p) for p in again.parameters()}.isdisjoint({id(p) for p in slot.module.parameters()})
    finally:
        tr.close()


@pytest.mark.slow
def test_germinations_in_a_run_are_all_cache_hits(tmp_path: Path) -> None:
    cfg = growing()
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"))
    summary = tr.run()
    assert summary["status"] == "COMPLETED", summary["failure"]
    events = run_events(tr.run_dir.path)
    germinated = [e for e in events if e["event"] == "command.accepted"
                  and e["attributes"]["command"]["kind"] == "germinate"]
    assert germinated, "no germination happened: nothing was tested"
    assert tr.parts.loader is not None
    life = tr.parts.loader.stats().lifetime
    assert life.gets >= len(germinated)
    assert (life.hits, life.misses, life.timeouts, life.load_failures) == (life.gets, 0, 0, 0)
    assert not [e for e in events if e["event"] in ("blueprint_load_failed", "blueprint_load_timeout",
                                                    "blueprint_compile_failed")]


def fail_to_build(monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    real = BlueprintRegistry.build

    def build(self: BlueprintRegistry, name: str, shape: SlotShape, generator_seed: int) -> nn.Module:
        if name == broken:
            raise ValueError(f"test: {name} weights are unreadable")
        return real(self, name, shape, generator_seed)

    monkeypatch.setattr(BlueprintRegistry, "build", build)


@pytest.mark.slow
def test_a_germination_whose_blueprint_fails_to_load_is_rejected_with_the_reason(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fail_to_build(monkeypatch, "gated")
    cfg = growing('seeds.blueprints=["gated"]')
    tr = Trainer(cfg, RunDir.create(cfg, tmp_path / "run"))
    summary = tr.run()
    assert (summary["status"], summary["exit_code"]) == ("COMPLETED", 0), summary["failure"]
    events = run_events(tr.run_dir.path)
    asked = [e for e in events if e["event"] in ("command.accepted", "command.rejected")
             and e["attributes"]["command"]["kind"] == "germinate"]
    assert asked, "the controller never asked to germinate: nothing was tested"
    for e in asked:
        assert e["event"] == "command.rejected"
        assert e["attributes"]["stage"] == "kasmina"
        assert "gated" in e["attributes"]["reason"] and "weights are unreadable" in e["attributes"]["reason"]
    # nothing changed in any slot: no transition, no module, no optimizer rebuild for a seed
    assert not [e for e in events if e["event"] == "seed.transition"]
    assert not [e for e in events if e["event"] == "optimizer.rebuilt"]
    assert all(s.module is None and s.stage == "DORMANT" and s.germinations == 0
               for s in tr.parts.kasmina.slots.values())
    assert [s["stage"] for s in summary["seeds"]] == ["DORMANT", "DORMANT"]
    # the failure was an error, counted, never a fallback module
    failed = [e for e in events if e["event"] == "blueprint_load_failed"]
    assert failed and all(e["level"] == "ERROR" and e["attributes"]["blueprint"] == "gated" for e in failed)
    assert tr.parts.loader is not None and tr.parts.loader.stats().lifetime.load_failures == len(failed)
