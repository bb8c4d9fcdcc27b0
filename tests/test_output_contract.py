"""Issue 26: the terminal never decides a run's fate. Under --json stdout is exactly one document whatever the
user's code prints; a closed stdout, a reader that went away and a stdout nobody reads leave the run, its outcome
and its exit code alone, and a signal still stops a run whose stdout is full."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import BASE_TOML, ESPER, REPO, checkpoint_dirs, sets, summary, wait_for

from esper.core.errors import ExitCode

JOB = ['data.task="synthetic"', "run.threads=1"]
PRINTING = ["host.factory='plugins_fixture:printing_host'", "seeds.slots=[{name='s1', layer='hidden1'}]"]
ENV = {**os.environ, "COLUMNS": "250", "PYTHONPATH": str(REPO / "tests")}


def _cmd(run: Path, *items: str, flags: tuple[str, ...] = ("--quiet",)) -> list[str]:
    return [str(ESPER), "--config", str(BASE_TOML), "train", *flags, "--run-dir", str(run), *sets(*JOB, *items)]


def test_under_json_stdout_is_one_document_though_the_users_host_prints(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = subprocess.run(_cmd(run, *PRINTING, "trainer.epochs=2", flags=("--json",)), capture_output=True,
                          env=ENV, timeout=240)
    assert done.returncode == 0, done.stderr.decode()
    doc = json.loads(done.stdout)  # the whole of stdout parses as one document
    assert doc["status"] == "COMPLETED" and doc["run_dir"] == str(run)
    assert b"my host says hello" in done.stderr and b"raw write to fd 1" in done.stderr


def test_a_closed_stdout_keeps_the_run_its_outcome_and_its_exit_code(tmp_path: Path) -> None:
    for flags, name in ((("--json",), "json"), (("--quiet",), "quiet"), ((), "rich")):
        run = tmp_path / name
        done = subprocess.run(_cmd(run, "trainer.epochs=2", flags=flags), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, env=ENV, timeout=240,
                              preexec_fn=lambda: os.close(1))  # the child starts with descriptor 1 closed
        assert done.returncode == 0, (name, done.stderr.decode())
        assert b"Traceback" not in done.stderr and summary(run)["status"] == "COMPLETED"
        assert not (run / "events.jsonl").read_bytes().startswith(b"epoch")  # nothing printed into a run file


def test_a_reader_that_goes_away_does_not_fail_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    child = subprocess.Popen(_cmd(run, "trainer.epochs=40"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV)
    assert child.stdout is not None and child.stdout.readline().startswith(b"epoch 1/40")
    child.stdout.close()  # `esper train | head -1`
    _, err = child.communicate(timeout=240)
    assert child.returncode == 0 and b"Traceback" not in err, err.decode()
    assert summary(run)["status"] == "COMPLETED" and summary(run)["epochs_completed"] == 40


def test_a_stdout_nobody_reads_neither_blocks_the_run_nor_a_stop(tmp_path: Path) -> None:
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 4096)
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"x" * 4096)  # fill the pipe: the child's first write would block for ever
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    run = tmp_path / "run"
    log = tmp_path / "stderr"
    with open(log, "wb") as err:
        child = subprocess.Popen(_cmd(run, "trainer.epochs=100000"), stdout=w, stderr=err, env=ENV,
                                 start_new_session=True)
    os.close(w)
    try:
        wait_for(lambda: (run / "checkpoints").is_dir() and len(checkpoint_dirs(run)) >= 3, child, log,
                 "three epochs with a full stdout")
        child.send_signal(signal.SIGTERM)
        assert child.wait(timeout=120) == ExitCode.SIGTERM
    finally:
        if child.poll() is None:
            child.kill()
        os.close(r)
    assert summary(run)["status"] == "STOPPED"
    assert sys.platform.startswith("linux")  # F_SETPIPE_SZ: the suite runs on Linux


def test_an_ascii_only_locale_gets_ascii_output_not_a_crash(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**ENV, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": ""}
    done = subprocess.run(_cmd(run, "trainer.epochs=2", flags=()), capture_output=True, env=env, timeout=240)
    assert done.returncode == 0 and b"Traceback" not in done.stderr, done.stderr.decode(errors="replace")
    for args in (["inspect-checkpoint", str(run), "--verify"], ["runs", str(tmp_path)], ["faults", "list"],
                 ["lifecycle", "seed"]):
        shown = subprocess.run([str(ESPER), *args], capture_output=True, env=env, timeout=120)
        assert shown.returncode == 0, (args, shown.stderr.decode(errors="replace"))
        assert shown.stdout.isascii() and shown.stdout.strip(), args


def test_a_reader_that_stops_reading_a_view_gets_no_traceback_and_the_sigpipe_code(tmp_path: Path) -> None:
    """`esper config show | head -1`: Click's own handler exited 1 (a bug, in Esper's codes) and Rich's too."""
    for args in (["config", "show"], ["lifecycle", "seed"]):
        child = subprocess.Popen([str(ESPER), "--config", str(BASE_TOML), *args], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, env=ENV)
        assert child.stdout is not None and child.stdout.read(5)
        child.stdout.close()
        _, err = child.communicate(timeout=120)
        assert child.returncode == ExitCode.SIGPIPE and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_a_signal_after_the_outcome_is_written_does_not_change_the_exit_status(tmp_path: Path) -> None:
    """Issue 26: in the second after summary.json, SIGINT/SIGTERM gave exit 0, 130 without the outcome lines, or
    death by the signal, for a COMPLETED run. Signals are sent as soon as the summary appears, until exit."""
    run = tmp_path / "run"
    log = tmp_path / "log"
    with open(log, "wb") as fh:
        child = subprocess.Popen(_cmd(run, "trainer.epochs=3"), stdout=fh, stderr=subprocess.STDOUT, env=ENV,
                                 start_new_session=True)
    wait_for(lambda: (run / "summary.json").exists(), child, log, "the summary", timeout=240)
    while child.poll() is None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                child.send_signal(sig)
            except ProcessLookupError:
                break
    assert child.wait(timeout=60) == 0 == summary(run)["exit_code"], log.read_text()
    assert summary(run)["status"] == "COMPLETED" and "Traceback" not in log.read_text()


def test_settle_returns_once_what_was_queued_is_written_and_never_hangs_on_a_reader_that_is_gone() -> None:
    """The live view's last frame (stderr) must be out before the outcome (stdout): each stream has its own writer
    thread, so `esper train` settles stderr first (a log taking both interleaved them, once in a CI run)."""
    from esper.cli.unblocked import Unblocked

    r, w = os.pipe()
    try:
        stream = Unblocked(w)
        stream.write("last frame\n" * 100)
        stream.settle()
        os.set_blocking(r, False)
        assert os.read(r, 1 << 16) == b"last frame\n" * 100  # all of it, already in the pipe
        os.close(r)  # the reader goes away
        stream.write("x" * (1 << 20))  # more than a pipe holds: the write fails in the thread
        stream.settle(wait_s=5.0)  # returns (broken), no hang
        assert stream.broken
        stream.finish(wait_s=1.0)
    finally:
        os.close(w)


def test_signals_after_the_outcome_is_written_never_abort_the_session() -> None:
    """A flood of SIGTERM/SIGINT between summary.json and the end of `train()` once ended exit 130 (a second SIGINT
    is an abort): once the outcome is settled the trainer's handler takes no signal."""
    from esper.core.tolaria.signals import StopRequest, graceful_signals

    stop = StopRequest()
    with graceful_signals(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested  # before it is settled, a signal asks the run to stop
        stop.settled = True
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            os.kill(os.getpid(), sig)  # handled synchronously in the main thread: no KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), graceful_signals(StopRequest()):
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # unsettled: the second signal is the operator's abort, as before
