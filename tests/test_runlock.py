"""One writer per run directory (S-5): the lock refuses a second writer at once and dies with its holder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import esper, out
from conftest import hold_lock as _holder

from esper.core.errors import ExitCode
from esper.core.records.runlock import LOCK_NAME, RunDirBusy, RunLock, writer_alive


def test_a_second_writer_is_refused_with_the_busy_exit_code_and_the_holder_keeps_it(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as err, RunLock(tmp_path):
            pass
        assert err.value.exit_code == ExitCode.BUSY == 8
        assert "in use by another esper process" in str(err.value)
        assert writer_alive(tmp_path)
    finally:
        proc.communicate("")
    assert proc.returncode == 0
    assert not writer_alive(tmp_path)
    with RunLock(tmp_path) as lock:  # released with its holder: the directory is writable again
        assert lock.held


def test_a_killed_writer_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc = _holder(tmp_path)
    proc.kill()
    proc.wait()
    assert (tmp_path / LOCK_NAME).exists()  # the file stays; the lock died with the process
    assert not writer_alive(tmp_path)
    with RunLock(tmp_path):
        pass


def test_probing_never_takes_the_lock_from_its_own_holder(tmp_path: Path) -> None:
    with RunLock(tmp_path) as lock:
        for _ in range(50):
            assert writer_alive(tmp_path)
        assert lock.held
    assert not lock.held
    assert not writer_alive(tmp_path)


def test_a_directory_never_locked_has_no_writer(tmp_path: Path) -> None:
    assert not writer_alive(tmp_path)
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_symlinked_lock_file_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(target, run / LOCK_NAME)
    with pytest.raises(RunDirBusy, match="symbolic link"), RunLock(run):
        pass
    assert not writer_alive(run)
    assert target.read_text() == "precious\n"


@pytest.mark.parametrize("command", [["train"], ["simulate-emergency", "--fault", "nan_loss", "--synthetic"]])
def test_a_refused_start_in_a_users_directory_writes_nothing_there(tmp_path: Path, command: list[str]) -> None:
    """Issue 26: a non-empty directory that is not a run is refused, and keeps exactly what it held."""
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    r = esper(*command, "--run-dir", str(target))
    assert r.exit_code == ExitCode.USAGE and "it is not empty (it holds notes.txt)" in r.stderr, out(r)
    assert sorted(os.listdir(target)) == ["notes.txt"] and (target / "notes.txt").read_text() == "keep me"
    resumed = esper("train", "--resume", str(tmp_path / "none"), "--run-dir", str(target))
    assert resumed.exit_code != 0 and sorted(os.listdir(target)) == ["notes.txt"]
