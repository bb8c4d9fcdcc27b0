"""`esper emergency clear RUN --reason TEXT` (issue 12 §10): an operator's downgrade, delivered through the run
directory to the running process, applied at a step boundary and recorded like every change. Real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from conftest import ESPER, SYNTHETIC, events, finish, reported, spawn, wait_for

from esper.core import requests
from esper.core.errors import ExitCode

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
