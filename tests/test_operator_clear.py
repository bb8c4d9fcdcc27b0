"""`esper emergency clear RUN --reason TEXT` (issue 12 §10): an operator's downgrade, delivered through the run
directory to the running process, applied at a step boundary and recorded like every change. Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from conftest import ESPER, SYNTHETIC, events, finish, out, reported, resume, spawn, train, wait_for

from esper.core.errors import ExitCode
from esper.core.records import requests

# Every step is "slow" (NOTICE) and the run is long: it sits at NOTICE, never healthy enough to clear itself.
NOTICED = [*SYNTHETIC, "run.threads=1", "seeds.max_step_latency_ms=600000.0",
           "controller.risk.max_step_latency_ms=600000.0", "controller.timeout_ms=120000",
           "emergency.slow_step_ms=0.001", "trainer.epochs=5000"]


def clear(run: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(ESPER), "emergency", "clear", str(run), *flags], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "250"})


def test_clear_reaches_the_running_process_and_is_recorded(tmp_path: Path) -> None:
    run, log = tmp_path / "run", tmp_path / "train.log"
    proc = spawn(run, *NOTICED, log=log)
    try:
        wait_for(lambda: reported(run, "emergency.level", to_level="NOTICE"), proc, log, "the run to reach NOTICE")
        # A forged request in the run dir is answered as invalid, never applied, and never quoted.
        (run / requests.DIRNAME).mkdir(exist_ok=True)
        (run / requests.DIRNAME / "forged.json").write_bytes(b'{"kind": "emergency.clear", "x": [[[[' + b"9" * 50)
        done = clear(run, "--reason", "ops checked the loss curve", "--json")
        assert done.returncode == 0, done.stderr + done.stdout
        answer = json.loads(done.stdout)
        assert answer["outcome"] == "applied" and answer["request_id"].startswith("req-")
        assert answer["level_before"] == "NOTICE" and answer["level_after"] == "NOMINAL"
        assert proc.poll() is None  # the run goes on
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    assert finish(proc, log) == ExitCode.SIGTERM, log.read_text()

    recorded = events(run)
    answers = [e for e in recorded if e["event"] == requests.EVENT]
    assert {e["source"] for e in answers} == {"cli"}
    forged = [e for e in answers if e["attributes"]["file"] == "forged.json"]
    assert forged and forged[0]["attributes"]["outcome"] == "invalid" and "9999" not in json.dumps(forged[0])
    [applied] = [e for e in answers if e["attributes"]["outcome"] == "applied"]
    assert applied["attributes"]["request_id"] == answer["request_id"]
    # Recorded like every change: the table's own `clear`, with the operator's reason, just before the answer.
    cleared = [e for e in recorded if e["event"] == "emergency.level" and e["attributes"]["to_level"] == "NOMINAL"
               and e["seq"] < applied["seq"]]
    assert cleared, "no emergency.level transition to NOMINAL before the answer"
    transition = cleared[-1]["attributes"]["transition"]
    assert transition["trigger"] == "clear" and "ops checked the loss curve" in transition["reason"]
    assert not any((run / requests.DIRNAME).iterdir())  # every request was taken
    # The CLI's own events (the operator's request, the operator's signal) have source cli.
    assert [e["source"] for e in recorded if e["event"] == "stop.requested"] == ["cli"]

    # A run that is not running has nothing to clear: exit 5, said, nothing written.
    late = clear(run, "--reason", "too late", "--json")
    assert late.returncode == ExitCode.ILLEGAL
    doc = json.loads(late.stdout)
    assert doc["exit_code"] == ExitCode.ILLEGAL and "not running" in doc["error"]
    assert not any((run / requests.DIRNAME).iterdir()) and "Traceback" not in late.stderr


def test_clear_refuses_a_path_that_is_not_a_run(tmp_path: Path) -> None:
    done = clear(tmp_path, "--reason", "x")
    assert done.returncode == ExitCode.USAGE and "not a run directory" in done.stderr
    assert "Traceback" not in done.stderr and list(tmp_path.iterdir()) == []


def test_requests_left_from_before_a_start_are_stale_and_never_applied(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert train(run, *SYNTHETIC, "run.threads=1", "trainer.epochs=1").exit_code == 0
    run_id = events(run)[0]["run_id"]
    old = requests.deliver(run, requests.new_request("emergency.clear", run_id, "written while nothing ran"))
    r = resume(run, *SYNTHETIC, "run.threads=1", "trainer.epochs=2", allow=["trainer.epochs"])
    assert r.exit_code == 0, out(r)
    [answer] = [e["attributes"] for e in events(run, requests.EVENT)]
    assert answer["outcome"] == "stale" and answer["request_id"] == old.stem
    assert not old.exists() and not events(run, "emergency.level")


def test_a_request_file_is_read_bounded_and_never_quoted(tmp_path: Path) -> None:
    directory = tmp_path / requests.DIRNAME
    directory.mkdir()
    (directory / "big.json").write_bytes(b'{"kind": "' + b"A" * 100_000 + b'"}')
    (directory / "deep.json").write_bytes(b"[" * 50_000)
    (directory / "wrong.json").write_text(json.dumps({"kind": "emergency.raise", "run_id": "r"}))
    (directory / "link.json").symlink_to(tmp_path / "elsewhere.json")
    (tmp_path / "elsewhere.json").write_text("SECRET")
    taken = list(requests.take(tmp_path))
    assert sorted(name for name, _, _ in taken) == ["big.json", "deep.json", "link.json", "wrong.json"]
    assert all(req is None and why for _, req, why in taken)
    assert not any("SECRET" in why or "AAAA" in why for _, _, why in taken)
    assert list(directory.iterdir()) == [] and (tmp_path / "elsewhere.json").read_text() == "SECRET"
