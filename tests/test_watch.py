"""`esper watch RUN` (V-2): a real `esper watch` process follows a real run in another process to its end and
exits with the run's exit code; a torn last line is read once it completes; a SIGKILLed writer is noticed (exit 9)
instead of waited on forever. Every step waits on what the processes report (lines, files), never on a duration."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from conftest import (
    BASE_TOML,
    GROWING,
    esper,
    hold_lock,
    out,
    release,
    sets,
    spawn,
    spawn_esper,
    train,
    wait_for,
    wait_until,
)

from esper.core.errors import ExitCode
from esper.core.records.runlock import writer_alive


def _epoch_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("epoch ")]


def _watch(run: Path) -> subprocess.Popen[str]:
    return spawn_esper("watch", str(run), "--interval", "0.05")


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "code", "status"), [(None, ExitCode.OK, "COMPLETED"),
                                                       ("sigterm@3:1", ExitCode.SIGTERM, "STOPPED")])
def test_watch_follows_a_run_in_another_process_to_its_end_and_exits_with_its_code(
        tmp_path: Path, fault: str | None, code: int, status: str) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = spawn(run, *GROWING, "trainer.epochs=8", log=log, flags=["--fault", fault] if fault else [])
    wait_for(lambda: (run / "run.lock").exists(), proc, log, "the run to take its writer lock")
    watcher = _watch(run)
    w_out, w_err = watcher.communicate(timeout=240)
    assert proc.wait(240) == code, log.read_text()
    assert watcher.returncode == code, w_out + w_err
    trained = _epoch_lines(log.read_text())
    assert trained and _epoch_lines(w_out) == trained  # every epoch, once, as the run itself printed it
    assert f"{status} run " in w_out and f"run directory: {run}" in w_out
    assert "warning" not in w_err


@pytest.mark.slow
def test_watch_notices_a_sigkilled_writer_and_exits_incomplete(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = spawn(run, *GROWING, "trainer.epochs=400", log=log)
    wait_for(lambda: (run / "run.lock").exists(), proc, log, "the run to take its writer lock")
    watcher = _watch(run)
    assert watcher.stdout is not None
    seen = []
    while not (seen and seen[-1].startswith("epoch 2/400")):
        line = watcher.stdout.readline()
        assert line, f"watch ended early: {seen} {watcher.stderr.read() if watcher.stderr else ''}"
        seen.append(line)
    os.killpg(proc.pid, signal.SIGKILL)  # the whole session: trainer and controller worker, no summary written
    proc.wait(60)
    rest, err = watcher.communicate(timeout=120)
    assert watcher.returncode == ExitCode.INCOMPLETE, rest + err
    assert not (run / "summary.json").exists()
    assert "ended without a summary" in err and "killed or crashed" in err
    assert f"esper train --resume {run}" in err  # its checkpoint is usable: the way out is named
    assert "Traceback" not in err


@pytest.mark.slow
def test_watch_reads_a_torn_line_once_it_completes_and_reports_one_left_torn(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.toml").write_text("[trainer]\nepochs = 3\n")
    rows = [json.dumps({"epoch": e, "train_loss": 1.0 / e, "val_loss": 1.5 / e, "val_accuracy": 0.2 * e,
                        "params": 10, "seeds_by_stage": {"DORMANT": 1}, "emergency_level": "NOMINAL"}) + "\n"
            for e in (1, 2, 3)]
    holder = hold_lock(run)  # a live writer, as the watcher sees one
    metrics = run / "metrics.jsonl"
    metrics.write_text(rows[0] + rows[1][:20])  # row 2 is half written
    watcher = _watch(run)
    assert watcher.stdout is not None
    assert watcher.stdout.readline().startswith("epoch 1/3 ")  # read while row 2 was still torn
    with open(metrics, "a") as fh:
        fh.write(rows[1][20:] + rows[2][:15])  # row 2 completes; row 3 is torn and never will be
    assert watcher.stdout.readline().startswith("epoch 2/3 ")
    (run / "summary.json").write_text(json.dumps({"run_id": "r", "status": "COMPLETED", "exit_code": 0,
                                                  "epochs_completed": 2, "final": {}, "seeds": [], "run_dir": "r"}))
    release(holder)
    rest, err = watcher.communicate(timeout=120)
    assert watcher.returncode == 0, rest + err
    assert _epoch_lines(rest) == [] and "COMPLETED run r" in rest
    assert "skipped metrics.jsonl line 3 (last, no newline: torn write?)" in err
    assert "line 2" not in err


def test_watch_of_a_finished_run_shows_it_and_exits_with_its_code(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "val_loss": 0.5, "params": 3}) + "\n")
    (run / "summary.json").write_text(json.dumps({"run_id": "x", "status": "HALTED", "exit_code": 6,
                                                  "epochs_completed": 1, "run_dir": str(run),
                                                  "failure": {"type": "Halt", "message": "[N, C, L] halted"}}))
    result = esper("watch", str(run))
    assert result.exit_code == ExitCode.HALTED, out(result)
    assert "epoch 1/- " in result.output and "HALTED run x" in result.output
    assert "[N, C, L] halted" in result.output  # bracketed text is never eaten as markup


def test_watch_refuses_what_is_not_a_run_and_gives_up_on_one_that_never_starts(tmp_path: Path) -> None:
    refused = esper("watch", str(tmp_path / "nope"), "--start-timeout", "0")
    assert refused.exit_code == ExitCode.USAGE and "not a run directory" in refused.output
    assert "(waited 0 s for one to appear)" in refused.output
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    other = esper("watch", str(tmp_path / "other"))  # something else entirely: refused at once, never waited on
    assert other.exit_code == ExitCode.USAGE and "waited" not in other.output
    starting = tmp_path / "starting"  # a run taking shape: its lock, and config.toml before the rename
    starting.mkdir()
    (starting / "run.lock").write_text("")
    (starting / ".config.toml.k2j4x9.tmp").write_text("[run]")
    waited = esper("watch", str(starting), "--start-timeout", "0")
    assert waited.exit_code == ExitCode.USAGE and "(waited 0 s for one to appear)" in waited.output
    (tmp_path / "config.toml").write_text("")
    never = esper("watch", str(tmp_path), "--start-timeout", "0")
    assert never.exit_code == ExitCode.INCOMPLETE and "no esper process has started writing it" in never.output


@pytest.mark.slow
def test_watch_of_a_resumed_run_follows_the_new_session_not_the_old_summary(tmp_path: Path) -> None:
    run = tmp_path / "run"
    items = [*GROWING, "trainer.epochs=6"]
    stopped = train(run, *items, extra=["--fault", "sigterm@3:1"])
    assert stopped.exit_code == ExitCode.SIGTERM, out(stopped)
    assert json.loads((run / "summary.json").read_text())["status"] == "STOPPED"
    proc = spawn_esper("--config", str(BASE_TOML), "train", "--quiet", "--resume", str(run), *sets(*items))
    wait_until(lambda: writer_alive(run) or proc.poll() is not None, "the resumed run to take the writer lock",
               timeout=120)
    watcher = _watch(run)
    w_out, w_err = watcher.communicate(timeout=240)
    p_out, p_err = proc.communicate(timeout=240)
    assert proc.returncode == 0, p_out + p_err
    assert watcher.returncode == 0, w_out + w_err  # not the stopped session's 143
    assert "COMPLETED run " in w_out and "epoch 6/6 " in w_out


@pytest.mark.slow
def test_watch_started_before_the_run_waits_for_it_and_follows_it(tmp_path: Path) -> None:
    """Issue 27: `esper watch RUN` right after `esper train --run-dir RUN` failed 'not a run directory'."""
    run, log = tmp_path / "run", tmp_path / "train.log"
    watcher = _watch(run)  # nothing there yet
    proc = spawn(run, *GROWING, "trainer.epochs=3", log=log)
    w_out, w_err = watcher.communicate(timeout=240)
    assert proc.wait(240) == 0 and watcher.returncode == 0, w_out + w_err
    assert _epoch_lines(w_out) == _epoch_lines(log.read_text()) and "COMPLETED run " in w_out
