"""The operator views' one run-dir reader: tailing a growing JSONL file by offset (a torn last line is held until
it completes), following a rewrite, and the cheap check of the last checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import GROWING, flip_byte, latest, train

from esper.app.views import read


def _row(epoch: int) -> bytes:
    return (json.dumps({"epoch": epoch, "val_loss": 1.0 / epoch}) + "\n").encode()


def test_tail_returns_only_what_was_appended_and_holds_a_torn_line_until_it_completes(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    tail = read.Tail(path)
    assert tail.poll().lines == []  # not there yet: nothing, no error
    path.write_bytes(_row(1) + _row(2)[:9])  # row 2 is half written: a writer mid-line
    first = tail.poll()
    assert [x.record["epoch"] for x in first.lines] == [1] and first.skipped == []
    assert tail.poll().lines == []  # nothing new: nothing read again
    with open(path, "ab") as fh:
        fh.write(_row(2)[9:] + _row(3))
    second = tail.poll()
    assert [(x.number, x.record["epoch"]) for x in second.lines] == [(2, 2), (3, 3)]
    assert second.skipped == [] and not second.reset


def test_tail_reports_a_torn_tail_once_the_writer_is_gone_and_keeps_numbering(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(_row(1) + b"not json\n" + _row(3) + b'{"epoch": 4, "va')
    tail = read.Tail(path)
    update = tail.poll()
    assert [x.number for x in update.lines] == [1, 3]
    assert [(s.number, s.kind, s.torn) for s in update.skipped] == [(2, "not_json", False)]
    torn = tail.finish()
    assert [(s.number, s.kind, s.torn) for s in torn.skipped] == [(4, "not_json", True)]
    assert "torn write" in torn.skipped[0].where()


def test_tail_starts_over_when_the_file_is_replaced_or_truncated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(_row(1) + _row(2) + _row(3))
    tail = read.Tail(path)
    assert len(tail.poll().lines) == 3
    replacement = tmp_path / ".metrics.tmp"
    replacement.write_bytes(_row(1))  # a resume rewrites the file from the checkpoint's history (a new inode)
    os.replace(replacement, path)
    update = tail.poll()
    assert update.reset and [x.record["epoch"] for x in update.lines] == [1]
    path.write_bytes(b"")  # truncated in place
    assert tail.poll().reset


def test_read_summary_and_config_report_damage_instead_of_raising(tmp_path: Path) -> None:
    assert read.read_summary(tmp_path) == (None, [])
    (tmp_path / "summary.json").write_text('{"status": "COMPL')
    doc, problems = read.read_summary(tmp_path)
    assert doc is None and "not valid JSON" in problems[0]
    (tmp_path / "summary.json").write_text("[1, 2]")
    assert read.read_summary(tmp_path)[1] == ["summary.json: not a JSON object"]
    (tmp_path / "config.toml").write_bytes(b"\xff\xfe = [")
    assert "not valid TOML" in read.read_config(tmp_path)[1][0]
    (tmp_path / "summary.json").unlink()
    (tmp_path / "summary.json").symlink_to(tmp_path / "config.toml")
    assert read.read_summary(tmp_path) == (None, ["summary.json: a symbolic link; Esper follows no link inside a run "
                                                  "or checkpoint directory (not read)"])


@pytest.mark.slow
def test_the_cheap_checkpoint_check_catches_a_missing_or_resized_file_and_a_bad_pointer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(run, *GROWING, "trainer.epochs=2").exit_code == 0
    ok = read.check_checkpoint(run)
    assert ok.ok and ok.path == str(latest(run)) and "not hashed" in ok.detail
    flip_byte(latest(run) / "model.safetensors")  # same size: the cheap check does not hash (verify does)
    assert read.check_checkpoint(run).ok
    with open(latest(run) / "optimizer.safetensors", "ab") as fh:
        fh.write(b"x")
    bad = read.check_checkpoint(run)
    assert not bad.ok and "optimizer.safetensors" in bad.detail and "manifest says" in bad.detail
    opt = latest(run) / "optimizer.safetensors"
    opt.write_bytes(opt.read_bytes()[:-1])
    assert read.check_checkpoint(run).ok
    (latest(run) / "rng.safetensors").unlink()
    missing = read.check_checkpoint(run)
    assert not missing.ok and "rng.safetensors: missing" in missing.detail
    manifest = latest(run) / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["epoch"] = 99  # an edit that still parses breaks the seal
    manifest.write_text(json.dumps(doc))
    assert "manifest_sha256" in read.check_checkpoint(run).detail
    (run / "checkpoints" / "latest").write_text("../../etc")
    assert not read.check_checkpoint(run).ok and read.check_checkpoint(run).path is None
    (run / "checkpoints" / "latest").unlink()
    assert read.check_checkpoint(run) == read.CheckpointCheck(None, False, "no checkpoint yet")
