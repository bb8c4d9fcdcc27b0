"""`esper runs [DIR]` (V-3): one row per run — finished (from its summary), RUNNING (a live writer holds its lock)
or INCOMPLETE (no writer, no summary of its last session) — non-run entries skipped and named, and no run
directory, however damaged, makes it fail."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import GROWING, esper, events, hold_lock, latest, metrics, out, release, summary, train
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from esper.app.views import read
from esper.cli.runs import collect
from esper.core.errors import ExitCode

T1, T2 = "2026-01-01T10:00:00.000000+00:00", "2026-01-01T11:00:00.000000+00:00"


def _run(parent: Path, name: str, *, rows: int = 2, summary: dict[str, object] | None = None,
         starts: tuple[str, ...] = (T1,), lock_file: bool = True) -> Path:
    run = parent / name
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(
        {"epoch": e, "val_loss": 1.0 / e, "val_accuracy": 0.1 * e, "seeds_by_stage": {"FOSSILIZED": e - 1}}) + "\n"
        for e in range(1, rows + 1)))
    lines = [{"utc": utc, "epoch": None, "event": "run.started" if i == 0 else "run.resuming",
              "attributes": {"epochs": 5, "task": {"name": "t", "primary_metric": "val_accuracy", "direction": "max"}}}
             for i, utc in enumerate(starts)]
    (run / "events.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    if lock_file:
        (run / "run.lock").write_text("")
    return run


def test_runs_lists_finished_running_and_incomplete_runs_and_names_what_it_skipped(tmp_path: Path) -> None:
    _run(tmp_path, "done", summary={"run_id": "done-id", "status": "COMPLETED", "exit_code": 0, "started": T1})
    live = _run(tmp_path, "live")
    _run(tmp_path, "dead")
    _run(tmp_path, "resumed-dead", summary={"run_id": "rd", "status": "STOPPED", "exit_code": 143, "started": T1},
         starts=(T1, T2))
    resumed_live = _run(tmp_path, "resumed-live", summary={"status": "STOPPED", "exit_code": 143, "started": T1},
                        starts=(T1, T2))
    (tmp_path / "notes").mkdir()
    (tmp_path / "README").write_text("not a run")
    (tmp_path / "link").symlink_to(tmp_path / "done")
    holders = [hold_lock(live), hold_lock(resumed_live)]
    try:
        result = esper("runs", str(tmp_path), "--json")
    finally:
        for h in holders:
            release(h)
    assert result.exit_code == 0, out(result)
    doc = json.loads(result.stdout)
    by_path = {Path(r["path"]).name: r for r in doc["runs"]}
    assert {k: (r["status"], r["exit_code"]) for k, r in by_path.items()} == {
        "done": ("COMPLETED", 0), "live": ("RUNNING", None), "dead": ("INCOMPLETE", ExitCode.INCOMPLETE),
        "resumed-dead": ("INCOMPLETE", ExitCode.INCOMPLETE),  # the summary is the stopped session's, not the last
        "resumed-live": ("RUNNING", None)}
    done = by_path["done"]
    assert done["run_id"] == "done-id" and done["epochs_done"] == 2 and done["epochs_planned"] == 5
    assert (done["best"], done["best_epoch"], done["final"], done["seeds_fossilized"]) == (0.2, 2, 0.2, 1)
    assert done["checkpoint"] is None and done["checkpoint_check"]["detail"] == "no checkpoint yet"
    assert by_path["resumed-dead"]["sessions"] == 2 and by_path["resumed-dead"]["started"] == T1
    assert {Path(s["path"]).name: s["reason"] for s in doc["skipped"]} == {
        "notes": "not a run directory (no config.toml, events.jsonl, metrics.jsonl or summary.json)",
        "README": "not a directory", "link": "a symbolic link (not followed)"}


def test_runs_default_directory_comes_from_the_config_and_a_missing_one_is_a_usage_error(tmp_path: Path) -> None:
    _run(tmp_path, "one", summary={"status": "HALTED", "exit_code": 6})
    listed = esper("runs", "--set", f"run.output_dir={json.dumps(str(tmp_path))}")
    assert listed.exit_code == 0, out(listed)
    assert "one" in listed.stdout and "HALTED" in listed.stdout
    missing = esper("runs", str(tmp_path / "nowhere"))
    assert missing.exit_code == ExitCode.USAGE and "not a directory of runs" in missing.output
    bad_config = esper("runs", "--set", "run.output_dir=3")
    assert bad_config.exit_code == ExitCode.CONFIG


@pytest.mark.slow
def test_runs_row_of_a_real_run_matches_its_files(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "grown"
    assert train(run, *GROWING, "trainer.epochs=12").exit_code == 0
    result = esper("runs", str(run.parent), "--json")
    assert result.exit_code == 0, out(result)
    (row,) = json.loads(result.stdout)["runs"]
    rows, s = metrics(run), summary(run)
    acc = [r["val_accuracy"] for r in rows]
    assert row["run_id"] == s["run_id"] and row["status"] == "COMPLETED" and row["exit_code"] == 0
    assert (row["epochs_done"], row["epochs_planned"]) == (12, 12)
    assert row["best"] == max(acc) and row["final"] == acc[-1] == s["final"]["val_accuracy"]
    assert row["seeds_fossilized"] == sum(x["stage"] == "FOSSILIZED" for x in s["seeds"]) == 2
    assert row["checkpoint"] == str(latest(run)) == s["checkpoint"] and row["checkpoint_check"]["ok"]
    (started,) = events(run, "run.started")
    assert row["started"] == started["utc"] == s["started"] and row["duration_s"] > 0
    assert started["attributes"]["task"] == s["task"] == {"name": "synthetic", "primary_metric": "val_accuracy",
                                                          "direction": "max", "metrics": ["val_loss", "val_accuracy"]}
    assert started["attributes"]["epochs"] == 12 and started["attributes"]["steps_per_epoch"] == 6
    table = esper("runs", str(run.parent))
    assert s["run_id"] in table.stdout and "epoch-0012" in table.stdout and "12/12" in table.stdout


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                     lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
                     max_leaves=12)
_keys = st.sampled_from(["epoch", "event", "attributes", "utc", "val_accuracy", "val_loss", "seeds_by_stage",
                         "status", "exit_code", "started", "slots", "transition", "slot", "to_level", "epochs",
                         "task", "primary_metric", "direction"])
_record = st.dictionaries(_keys, _json | st.dictionaries(_keys, _json, max_size=5), max_size=6)
_line = st.one_of(_record.map(json.dumps), st.binary(max_size=40).map(lambda b: b.decode("latin-1")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(events_=st.lists(_line, max_size=8), rows=st.lists(_line, max_size=8), summary_=_line,
       config=st.text(max_size=40), pointer=st.text(max_size=20), torn=st.booleans())
def test_no_run_directory_however_damaged_makes_runs_fail(tmp_path_factory: pytest.TempPathFactory,
                                                          events_: list[str], rows: list[str], summary_: str,
                                                          config: str, pointer: str, torn: bool) -> None:
    parent = tmp_path_factory.mktemp("hostile")
    run = parent / "run"
    (run / "checkpoints").mkdir(parents=True)
    end = "" if torn else "\n"
    (run / "events.jsonl").write_text("\n".join(events_) + end)
    (run / "metrics.jsonl").write_text("\n".join(rows) + end)
    (run / "summary.json").write_text(summary_)
    (run / "config.toml").write_text(config)
    (run / "checkpoints" / "latest").write_text(pointer)
    doc = collect(parent)
    (row,) = doc["runs"]
    assert row["status"] and json.loads(json.dumps(doc, allow_nan=True)) is not None
    result = esper("runs", str(parent), "--json")
    assert result.exit_code == 0 and "Traceback" not in result.output
    plotted = esper("plot", str(run), "-o", str(parent / "p.png"))
    assert plotted.exit_code in (0, ExitCode.USAGE) and "Traceback" not in plotted.output, out(plotted)


def _odd(path: Path, kind: str) -> None:
    """Replace a run file by a FIFO (no writer: an open that blocks would hang), a directory or an unreadable file."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.write_text("{}\n")
        path.chmod(0)


@pytest.mark.parametrize("name", ["events.jsonl", "metrics.jsonl", "summary.json", "config.toml"])
@pytest.mark.parametrize("kind", ["fifo", "dir"])
def test_a_fifo_or_a_directory_where_a_run_file_belongs_is_reported_by_every_view_never_waited_on(
        tmp_path: Path, name: str, kind: str) -> None:
    """Issue 26: one odd run directory neither hangs nor breaks `runs`, `plot`, `watch` or `reports`; each names
    the file. (A hang fails the test through the suite's timeout.)"""
    good = _run(tmp_path, "good", summary={"run_id": "good", "status": "COMPLETED", "exit_code": 0})
    odd = _run(tmp_path, "odd", rows=3, summary={"run_id": "odd", "status": "COMPLETED", "exit_code": 0})
    _odd(odd / name, kind)
    listed = esper("runs", str(tmp_path), "--json")
    assert listed.exit_code == 0, out(listed)
    doc = json.loads(listed.stdout)
    assert sorted(r["path"].rsplit("/", 1)[-1] for r in doc["runs"]) == ["good", "odd"]
    assert any(f"{name}: not a regular file (not read)" in p for r in doc["runs"] for p in r["problems"]), doc
    plotted = esper("plot", str(odd), "-o", str(tmp_path / "p.png"))
    assert plotted.exit_code in (0, ExitCode.USAGE) and "Traceback" not in plotted.output, out(plotted)
    if plotted.exit_code == 0:
        assert f"{name}: not a regular file (not read)" in plotted.stderr
    watched = esper("watch", str(odd), "--start-timeout", "0")
    assert "Traceback" not in watched.output and watched.exit_code in (0, ExitCode.INCOMPLETE), out(watched)
    assert f"{name}: not a regular file (not read)" in watched.stderr or name == "config.toml"
    assert good.is_dir()


@pytest.mark.parametrize("kind", ["fifo", "dir", "unreadable"])
def test_reports_names_a_field_report_log_it_cannot_read(tmp_path: Path, kind: str) -> None:
    run = _run(tmp_path, "run")
    _odd(run / "field_reports.jsonl", kind)
    if kind == "unreadable" and os.geteuid() == 0:
        os.setegid(65534)  # root reads anything: drop to nobody for the read, as another user would be
        os.seteuid(65534)
    try:
        r = esper("reports", str(run), "--json")
    finally:
        if kind == "unreadable" and os.geteuid() != os.getuid():
            os.seteuid(0)
            os.setegid(0)
    assert r.exit_code == ExitCode.USAGE and "Traceback" not in r.output, out(r)
    doc = json.loads(r.stdout)
    assert doc["error"].startswith(f"{run / 'field_reports.jsonl'}: cannot be read: ") or (
        kind == "unreadable" and doc["error"].startswith(f"{run}: cannot be read: "))  # the tmp dir is root's
    assert {"fifo": "not a regular file", "dir": "not a regular file", "unreadable": "Permission denied"}[kind] \
        in doc["error"]


def test_a_big_events_file_is_read_in_bounded_pieces(tmp_path: Path) -> None:
    """The views stream: each piece handed on holds at most one bounded read's records, never the whole file."""
    run = _run(tmp_path, "run")
    line = json.dumps({"utc": T1, "epoch": 1, "event": "telemetry.window", "attributes": {"pad": "x" * 1000}})
    n = (3 * read.MAX_POLL_READ) // len(line)
    (run / "events.jsonl").write_text((line + "\n") * n)
    sizes: list[int] = []
    problems = read.stream_jsonl(run, "events.jsonl", lambda lines: sizes.append(len(lines)))
    assert problems == [] and sum(sizes) == n
    assert max(sizes) <= read.MAX_POLL_READ // len(line) + 1 and len([s for s in sizes if s]) >= 3
