"""Crash safety (SPEC C-2, C-5; issue 4): SIGKILL anywhere leaves a `latest` that verifies and resumes;
SIGTERM/SIGINT stop gracefully (143/130) with a checkpoint; a second SIGINT aborts; keep_last pruning and the
write-failure path on real training. Signals go to the real console script in a subprocess."""

from __future__ import annotations

import os
import signal
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    BASE_TOML,
    SYNTHETIC,
    UNHURRIED,
    checkpoint_dirs,
    event_names,
    events,
    finish,
    latest,
    manifest,
    metrics,
    out,
    pointer_names,
    reported,
    resume,
    session_pids,
    spawn,
    summary,
    temp_dirs,
    train,
    verify,
    wait_for,
    wait_until,
)

from esper.app.session import TrainSession
from esper.core import config as config_mod
from esper.core.checkpoint import CheckpointWriteError, verify_checkpoint
from esper.core.checkpoint import write_checkpoint as real_write_checkpoint
from esper.core.errors import ExitCode
from esper.core.records.event_log import read_events

EPOCHS = 4
# The controller runs in-process (no worker start per run) except where the worker's fate is the point.
INLINE = 'controller.isolation="inline"'
PROCESS = 'controller.isolation="process"'
# 6 steps per epoch: an epoch is mostly its checkpoint write, paced by commit_delay_ms.
SMALL = [*SYNTHETIC, *UNHURRIED, f"trainer.epochs={EPOCHS}"]
# ~140 steps per epoch: a graceful stop inside an epoch has steps left to stop before.
LONG_EPOCHS = [*SYNTHETIC, *UNHURRIED, f"trainer.epochs={EPOCHS}", "data.synthetic_samples=12000",
               "data.batch_size=64"]


def delay(ms: int) -> str:
    return f"checkpoint.commit_delay_ms={ms}"


def assert_resumes_to_completion(run: Path, items: list[str]) -> None:
    """`latest` verifies; --resume (without the drill's slow writes) finishes the run with each epoch once."""
    v = verify(run)
    assert v.exit_code == 0, out(v)
    # without the drill's slow writes, and without the fault that held a run inside epoch 2
    r = resume(run, *items, delay(0), allow=["checkpoint.commit_delay_ms", "faults"])
    assert r.exit_code == 0, out(r)
    s = summary(run)
    assert s["status"] == "COMPLETED" and s["epochs_completed"] == EPOCHS
    assert [row["epoch"] for row in metrics(run)] == list(range(1, EPOCHS + 1))
    assert latest(run).name == f"epoch-{EPOCHS:04d}"
    assert verify(run).exit_code == 0
    assert temp_dirs(run) == []  # a crashed write's leftovers are cleaned by the next write
    assert event_names(run).count("resumed") >= 1


def assert_no_orphans(sid: int) -> None:
    """The killed trainer's controller worker (and anything else it started) goes away with it."""
    wait_until(lambda: not session_pids(sid), "the processes of the killed run to go", 15.0)


# ------------------------------------------------------------------------------------------------ SIGKILL


# A step of epoch 2 that takes 1.5 s (the slow_step drill fault): the run reports it (fault.injected, written at
# once with telemetry.batch_size=1) as the step begins, so a signal or a kill sent on that report lands inside
# epoch 2's steps, however fast the machine trains.
MID_EPOCH_FLAGS = ["--fault", "slow_step@2:3"]
MID_EPOCH_ITEMS = ["telemetry.batch_size=1", "emergency.slow_step_ms=1000.0"]


def in_epoch_2(run: Path) -> bool:
    return reported(run, "fault.injected", fault="slow_step", epoch=2)


KILL_POINTS: dict[str, dict[str, Any]] = {
    # inside the 2nd checkpoint write: every file written, before the rename (the slow-write hook holds it)
    # (with the controller worker alive: it must not outlive the killed trainer)
    "inside-write": {"items": [*SMALL, PROCESS, delay(1500)], "after": "tmp"},
    # the instant `latest` moved: pruning / the next epoch's first steps
    "just-after-commit": {"items": [*SMALL, INLINE, delay(300)], "after": "epoch-0002"},
    # inside the 2nd checkpoint write made on the background thread (checkpoint.async): the loop trains on while
    # it is held open; the kill lands before its rename (issue 15)
    "inside-async-write": {"items": [*SMALL, INLINE, "checkpoint.async=true", delay(1500)], "after": "tmp"},
    # inside a training step of epoch 2
    "inside-a-step": {"items": [*SMALL, *MID_EPOCH_ITEMS, INLINE, delay(300)], "after": "step",
                      "flags": MID_EPOCH_FLAGS},
}


@pytest.mark.slow
@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_anywhere_leaves_a_latest_that_verifies_and_resumes(tmp_path: Path, point: str) -> None:
    spec = KILL_POINTS[point]
    run, log = tmp_path / "run", tmp_path / "esper.log"
    proc = spawn(run, *spec["items"], log=log, flags=spec.get("flags", ()))
    if spec["after"] == "tmp":
        wait_for(lambda: any(t.startswith(".tmp-epoch-0002-") for t in temp_dirs(run)), proc, log,
                 "the second checkpoint write")
    elif spec["after"] == "step":
        wait_for(lambda: in_epoch_2(run), proc, log, "a step of epoch 2")
    else:
        wait_for(lambda: pointer_names(run) is not None and pointer_names(run) >= spec["after"], proc, log,
                 f"latest -> {spec['after']}")
    proc.kill()
    assert finish(proc, log) == -signal.SIGKILL
    assert_no_orphans(proc.pid)

    if spec["after"] == "tmp":
        # died mid-write: the half-committed checkpoint is a temp dir nobody reads; latest is the previous one
        assert pointer_names(run) == "epoch-0001"
        assert any(t.startswith(".tmp-epoch-0002-") for t in temp_dirs(run))
        assert "epoch-0002" not in checkpoint_dirs(run)
    if spec["after"] == "step":
        assert pointer_names(run) == "epoch-0001"  # died inside epoch 2: its checkpoint was never begun
    assert verify_checkpoint(run).ok
    assert_resumes_to_completion(run, spec["items"][:-1])


# ------------------------------------------------------------------------------------ SIGTERM / SIGINT


def signal_mid_epoch(run: Path, log: Path, items: list[str], *, group: bool, signum: int) -> Any:
    """Start a run and send ``signum`` once it reports being inside epoch 2's steps (``in_epoch_2``)."""
    proc = spawn(run, *items, log=log, flags=MID_EPOCH_FLAGS)
    wait_for(lambda: in_epoch_2(run), proc, log, "a step of epoch 2")
    if group:
        os.killpg(proc.pid, signum)  # what a terminal's Ctrl-C does: the controller worker gets it too
    else:
        proc.send_signal(signum)
    return proc


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code", "group", "isolation"), [
    (signal.SIGTERM, ExitCode.SIGTERM, False, INLINE),
    (signal.SIGINT, ExitCode.SIGINT, True, PROCESS),  # Ctrl-C reaches the controller worker as well
])
def test_sigterm_and_sigint_stop_gracefully_with_a_verified_checkpoint(tmp_path: Path, signum: int, code: int,
                                                                       group: bool, isolation: str) -> None:
    run, log = tmp_path / "run", tmp_path / "esper.log"
    items = [*LONG_EPOCHS, *MID_EPOCH_ITEMS, isolation]
    proc = signal_mid_epoch(run, log, items, group=group, signum=signum)
    assert finish(proc, log) == code, log.read_text()
    assert_no_orphans(proc.pid)
    s = summary(run)
    assert s["status"] == "STOPPED" and s["exit_code"] == code and s["failure"] is None, s
    assert "stop.requested" in event_names(run)
    assert "checkpoint.failed" not in event_names(run)
    stop = next(e for e in events(run) if e["event"] == "stop.requested")
    assert stop["attributes"]["signal"] == signal.Signals(signum).name
    # the checkpoint holds the state the run stopped in (nothing trained after it)
    ck = manifest(latest(run))
    assert ck["global_step"] == s["global_step"]
    assert ck["reason"] == "graceful_stop" and ck["step_in_epoch"] > 0, (ck["reason"], ck["step_in_epoch"])
    assert Path(s["checkpoint"]).name == latest(run).name
    assert_resumes_to_completion(run, items)


@pytest.mark.slow
def test_second_sigint_during_the_graceful_checkpoint_aborts_at_once_leaving_latest_valid(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "esper.log"
    items = [*LONG_EPOCHS, *MID_EPOCH_ITEMS, INLINE, delay(3000)]
    proc = signal_mid_epoch(run, log, items, group=False, signum=signal.SIGINT)
    wait_for(lambda: any("-step-" in t for t in temp_dirs(run)), proc, log, "the graceful checkpoint write")
    proc.send_signal(signal.SIGINT)
    assert finish(proc, log) == ExitCode.SIGINT, log.read_text()
    s = summary(run)
    assert s["exit_code"] == ExitCode.SIGINT and s["failure"]["type"] == "KeyboardInterrupt", s
    # aborted inside the write (had it waited, the graceful checkpoint would be latest), which never committed
    assert pointer_names(run) == "epoch-0001"
    assert temp_dirs(run) == []  # ... and was cleaned up
    assert_resumes_to_completion(run, items[:-1])


# ----------------------------------------------------------------------------------- C-2 on real training


@pytest.mark.slow
def test_keep_last_prunes_through_real_training(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *SYNTHETIC, "trainer.epochs=5", "checkpoint.keep_last=2")
    assert r.exit_code == 0, out(r)
    assert checkpoint_dirs(run) == ["epoch-0004", "epoch-0005"]
    assert latest(run).name == "epoch-0005"
    for name in checkpoint_dirs(run):
        assert verify_checkpoint(run / "checkpoints" / name).ok
    assert event_names(run).count("checkpoint.written") == 5


def run_in_process(run: Path, items: list[str]) -> dict[str, Any]:
    cfg = config_mod.load(BASE_TOML, items).config
    return TrainSession.prepare(cfg, run_dir=run).run(None)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_failed_checkpoint_write_is_critical_keeps_the_previous_and_training_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    run = tmp_path / "run"
    calls: list[str] = []
    seen_at_next_write: list[tuple[str | None, bool]] = []

    def flaky_write(ckpt_root: Path, name: str, *args: Any, **kwargs: Any) -> Path:
        calls.append(name)
        if name == "epoch-0002":
            raise CheckpointWriteError(f"writing checkpoint {ckpt_root / name} failed: [Errno 28] No space left")
        if name == "epoch-0003":  # the failed write left the previous checkpoint in charge, intact
            seen_at_next_write.append((pointer_names(run), verify_checkpoint(run).ok))
        return real_write_checkpoint(ckpt_root, name, *args, **kwargs)

    monkeypatch.setattr("esper.core.tolaria.checkpointer.write_checkpoint", flaky_write)
    monkeypatch.setattr("esper.core.checkpoint.background.write_checkpoint", flaky_write)  # checkpoint.async
    s = run_in_process(run, [*SMALL, INLINE, f"checkpoint.async={str(mode == 'async').lower()}"])

    assert calls == ["epoch-0001", "epoch-0002", "epoch-0003", "epoch-0004"]
    assert seen_at_next_write == [("epoch-0001", True)]
    failed = [e for e in events(run) if e["event"] == "checkpoint.failed"]
    assert len(failed) == 1 and failed[0]["level"] == "CRITICAL"
    assert "No space left" in failed[0]["attributes"]["error"]
    assert Path(failed[0]["attributes"]["kept"]).name == "epoch-0001"
    levels = [e["attributes"]["transition"]["dest"] for e in events(run) if e["event"] == "emergency.level"]
    assert levels and levels[0] != "NOMINAL"  # the failure escalated
    # training went on: every epoch trained, the next writes succeeded, the run completed
    assert s["status"] == "COMPLETED" and s["epochs_completed"] == 4
    assert "epoch-0002" not in checkpoint_dirs(run)
    assert latest(run).name == "epoch-0004" and verify_checkpoint(run).ok


# ------------------------------------------------------------------------------- crash leftovers in logs


@pytest.mark.slow
def test_resume_after_a_torn_events_line_keeps_every_new_event_readable(tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = train(run, *SYNTHETIC, "trainer.epochs=2")
    assert r.exit_code == 0, out(r)
    with open(run / "events.jsonl", "ab") as fh:  # what a SIGKILL in the middle of an event write leaves
        fh.write(b'{"seq": 999, "utc": "2026-01-01T00:0')
    r = resume(run, *SYNTHETIC, "trainer.epochs=3", allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    result = read_events(run / "events.jsonl")
    assert len(result.problems) == 1, result.problems  # the torn fragment, and only it
    names = [e["event"] for e in result.records]
    for event in ("config.changed_on_resume", "run.resuming", "resumed", "run.finished"):
        assert event in names, f"{event} was glued onto the torn line and lost"


@pytest.mark.slow
@pytest.mark.parametrize("background", [False, True])
def test_the_summary_says_what_checkpointing_cost_the_loop(tmp_path: Path, background: bool) -> None:
    """Issue 25's checkpoint share (`esper bench` P-9) is read from summary.json: the checkpoints written this
    session (a background write counts once it is settled) and the loop's seconds inside checkpointing."""
    run = tmp_path / "run"
    r = train(run, *SYNTHETIC, "trainer.epochs=3", "checkpoint.every_epochs=1",
              f"checkpoint.async={str(background).lower()}")
    assert r.exit_code == 0, out(r)
    s = summary(run)
    done = s["checkpointing"]
    assert done["written"] == len(events(run, "checkpoint.written")) == 3
    wall = datetime.fromisoformat(s["finished"]) - datetime.fromisoformat(s["started"])
    assert 0 < done["loop_seconds"] < wall.total_seconds()
