"""Real disk faults follow E-4 (issue 12 §6): ENOSPC and a read-only file system, at start, mid-run and on resume,
on a real small tmpfs, end in exit 6 with a message (never a traceback) and the last verified checkpoint intact.

Mounting needs root (CI runs as root); where the mount is refused the tests skip, saying why."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import SYNTHETIC, out, resume, snapshot, train, verify

from esper.core.errors import ExitCode

ITEMS = [*SYNTHETIC, "run.threads=1"]
Mount = Callable[..., Path]


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    points: list[Path] = []

    def mount(size: str, *options: str) -> Path:
        point = tmp_path / f"fs{len(points)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs",
                               str(point)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); needs root")
        points.append(point)
        return point

    yield mount
    for point in reversed(points):
        subprocess.run(["umount", "-l", str(point)], check=False)


def remount_ro(point: Path) -> None:
    subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)


def halted(result: object) -> str:
    text = out(result)  # type: ignore[arg-type]
    assert getattr(result, "exit_code") == ExitCode.HALTED, text  # noqa: B009 - a CliRunner result
    assert "Traceback" not in text
    return text


@pytest.mark.parametrize("size", ["48k", "120k"])  # 48k: room for the first checkpoint, not a second
def test_a_disk_that_fills_mid_run_halts_and_the_last_checkpoint_resumes(tmpfs: Mount, tmp_path: Path,
                                                                        size: str) -> None:
    run = tmpfs(size) / "run"
    text = halted(train(run, *ITEMS, "trainer.epochs=20"))
    assert "No space left on device" in text
    assert verify(run).exit_code == 0  # the last verified checkpoint is untouched
    roomy = tmp_path / "copy"
    shutil.copytree(run, roomy)
    r = resume(roomy, *ITEMS, "trainer.epochs=20")
    assert r.exit_code == 0, out(r)


def test_a_full_disk_at_start_halts_with_a_message(tmpfs: Mount) -> None:
    text = halted(train(tmpfs("4k") / "run", *ITEMS, "trainer.epochs=2"))
    assert "No space left on device" in text


def test_a_read_only_disk_at_start_halts_with_a_message(tmpfs: Mount) -> None:
    point = tmpfs("300k", "ro")
    text = halted(train(point / "run", *ITEMS, "trainer.epochs=2"))
    assert "Read-only file system" in text and list(point.iterdir()) == []


def test_a_read_only_disk_on_resume_halts_and_changes_nothing(tmpfs: Mount) -> None:
    point = tmpfs("600k")
    run = point / "run"
    r = train(run, *ITEMS, "trainer.epochs=2")
    assert r.exit_code == 0, out(r)
    before = snapshot(run)
    remount_ro(point)
    text = halted(resume(run, *ITEMS, "trainer.epochs=3", allow=["trainer.epochs"]))
    assert "Read-only file system" in text
    assert snapshot(run) == before and verify(run).exit_code == 0
