"""Telemetry emitter and reader: SPEC §7 O-1..O-4, §6 E-4."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from esper.core.config import TelemetryConfig
from esper.core.errors import EsperError
from esper.core.records import telemetry as tm
from esper.core.records.event_log import read_events
from esper.core.records.telemetry import (
    REQUIRED_FIELDS,
    Emitter,
    Level,
    TelemetryDeliveryError,
    TelemetryError,
    TelemetryWriteError,
)


class FakeClock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FlakyFile:
    """A real append handle whose writes fail while its opener has failures left."""

    def __init__(self, path: Path, owner: FlakyOpener) -> None:
        self._fh = open(path, "a", encoding="utf-8", newline="\n")  # noqa: SIM115 - closed via close()
        self._owner = owner

    def write(self, text: str, /) -> int:
        if self._owner.fail_left > 0:
            self._owner.fail_left -= 1
            raise OSError(errno.EIO, "injected write failure")
        return self._fh.write(text)

    def flush(self) -> None:
        self._fh.flush()

    def fileno(self) -> int:
        return self._fh.fileno()

    def close(self) -> None:
        self._fh.close()


class FlakyOpener:
    def __init__(self, fail_writes: int) -> None:
        self.fail_left = fail_writes
        self.opens = 0

    def __call__(self, path: Path) -> FlakyFile:
        self.opens += 1
        return FlakyFile(path, self)


def cfg(batch: int = 4, rate: int = 1000, retries: int = 3) -> TelemetryConfig:
    return TelemetryConfig(batch_size=batch, rate_limit_per_s=rate, critical_retries=retries)


def disk(path: Path) -> list[dict[str, Any]]:
    """What a second reader sees on disk right now; a problem line fails the test."""
    if not path.exists():
        return []
    result = read_events(path)
    assert result.problems == []
    return result.records


def events(path: Path) -> list[str]:
    return [r["event"] for r in disk(path)]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "events.jsonl"


# -- O-1 record shape ----------------------------------------------------------------------------------------

def test_record_shape_and_context(path: Path) -> None:
    clock = FakeClock(12.5)
    em = Emitter(path, "run-1", cfg(batch=1), clock=clock)
    em.emit("cli", "run.start")
    em.set_context(epoch=2, step=7)
    clock.t = 13.0
    rec = em.emit("kasmina", "seed.transition", Level.WARNING, seed="s0", to_stage=3)
    em.set_context(step=8)  # epoch left unchanged
    em.emit("tamiyo", "cmd.rejected", "error", reason="illegal")
    em.flush()
    on_disk = disk(path)
    assert [r["seq"] for r in on_disk] == [1, 2, 3]
    first, second, third = on_disk
    assert second == rec
    assert set(second) == set(REQUIRED_FIELDS)
    assert (first["epoch"], first["step"]) == (None, None)
    assert (second["epoch"], second["step"]) == (2, 7)
    assert (third["epoch"], third["step"]) == (2, 8)
    assert second["run_id"] == "run-1"
    assert second["source"] == "kasmina" and second["event"] == "seed.transition"
    assert second["level"] == "WARNING" and third["level"] == "ERROR"
    assert second["attributes"] == {"seed": "s0", "to_stage": 3}
    assert first["monotonic_ms"] == 12500.0 and second["monotonic_ms"] == 13000.0
    utc = datetime.fromisoformat(second["utc"])
    assert utc.utcoffset() is not None and utc.utcoffset().total_seconds() == 0
    assert abs((datetime.now(UTC) - utc).total_seconds()) < 60


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"source": "trainer", "event": "x"}, "unknown source"),
        ({"source": "cli", "event": ""}, "bad event name"),
        ({"source": "cli", "event": "has space"}, "bad event name"),
        ({"source": "cli", "event": "x", "level": "DEBUG"}, "unknown level"),
        ({"source": "cli", "event": "x", "obj": object()}, "not JSON-safe"),
        ({"source": "cli", "event": "x", "bad": {1: "int key"}}, "not a string"),
    ],
)
def test_bad_emit_is_a_typed_error(path: Path, kwargs: dict[str, Any], match: str) -> None:
    em = Emitter(path, "r", cfg())
    with pytest.raises(TelemetryError, match=match):
        em.emit(**kwargs)
    assert em.stats["emitted"] == {"INFO": 0, "WARNING": 0, "ERROR": 0, "CRITICAL": 0}
    assert issubclass(TelemetryError, EsperError)


@pytest.mark.parametrize("bad", [{"epoch": -1}, {"step": 1.5}, {"epoch": True}])
def test_set_context_validates(bad: dict[str, Any]) -> None:
    with pytest.raises(TelemetryError):
        Emitter(None, "r", cfg()).set_context(**bad)


def test_non_finite_attributes_serialise(path: Path) -> None:
    em = Emitter(path, "r", cfg(batch=1))
    em.emit("tolaria", "step.loss", loss=float("nan"), grad=float("inf"),
            nested={"lo": float("-inf"), "vals": (1.5, float("nan"))}, level_enum=Level.ERROR, where=path)
    raw = path.read_text(encoding="utf-8")

    def reject(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token} written")

    rec = json.loads(raw.splitlines()[0], parse_constant=reject)
    assert rec["attributes"] == {
        "loss": "nan", "grad": "inf", "nested": {"lo": "-inf", "vals": [1.5, "nan"]},
        "level_enum": "ERROR", "where": str(path),
    }


# -- O-2 batching and CRITICAL bypass ------------------------------------------------------------------------

def test_info_is_batched_until_full_or_flush(path: Path) -> None:
    em = Emitter(path, "r", cfg(batch=3))
    em.emit("tolaria", "a")
    em.emit("tolaria", "b")
    assert events(path) == []
    em.emit("tolaria", "c")  # batch full
    assert events(path) == ["a", "b", "c"]
    em.emit("tolaria", "d", Level.ERROR)  # ERROR is batched too
    assert events(path) == ["a", "b", "c"]
    assert em.stats["pending"] == 1
    em.flush()
    assert events(path) == ["a", "b", "c", "d"]
    assert em.stats["batches"] == 2


def test_critical_is_durable_before_emit_returns_and_keeps_order(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsynced: list[list[str]] = []
    real_fsync = tm.os.fsync

    def spy(fd: int) -> None:
        real_fsync(fd)
        fsynced.append(events(path))  # what was on disk at the moment of the fsync

    monkeypatch.setattr(tm.os, "fsync", spy)
    seen_in_callback: list[list[str]] = []
    em = Emitter(path, "r", cfg(batch=100))
    em.subscribe(lambda r: seen_in_callback.append(events(path)) if r["level"] == "CRITICAL" else None)
    em.emit("tolaria", "before.1")
    em.emit("kasmina", "before.2", Level.WARNING)
    assert events(path) == []
    em.emit("tolaria", "emergency.halt", Level.CRITICAL, reason="drill")
    assert events(path) == ["before.1", "before.2", "emergency.halt"]
    assert fsynced == [["before.1", "before.2", "emergency.halt"]]
    assert seen_in_callback == [["before.1", "before.2", "emergency.halt"]]
    em.emit("tolaria", "after")
    assert events(path) == ["before.1", "before.2", "emergency.halt"]  # INFO batches again


# -- O-2 rate limit; E-4 / Tolaria #2, #24 never drop emergencies --------------------------------------------

def test_rate_limit_drops_are_counted_and_reported(path: Path) -> None:
    clock = FakeClock(0.0)
    em = Emitter(path, "r", cfg(batch=1, rate=3), clock=clock)
    kept = [em.emit("tolaria", "step.a") for _ in range(3)]
    dropped = [em.emit("tolaria", "step.a"), em.emit("kasmina", "blend.b", Level.WARNING),
               em.emit("kasmina", "blend.b", Level.WARNING)]
    assert all(kept) and dropped == [None, None, None]
    # Past the cap, ERROR and CRITICAL still go through in the same window.
    for i in range(5):
        assert em.emit("tolaria", "emergency.raised", Level.CRITICAL, i=i) is not None
        assert em.emit("tolaria", "step.error", Level.ERROR, i=i) is not None
    assert em.stats["dropped"] == 3
    assert "telemetry.dropped" not in events(path)
    clock.t = 0.999
    assert em.emit("tolaria", "step.a") is None  # still the same 1-second window
    clock.t = 1.0  # window rolls over: the report comes first, then the new event
    em.emit("tolaria", "step.c")
    on_disk = disk(path)
    assert [r["event"] for r in on_disk[-2:]] == ["telemetry.dropped", "step.c"]
    report = on_disk[-2]
    assert report["level"] == "WARNING" and report["source"] == "telemetry"
    assert report["attributes"] == {"dropped": {"blend.b": 2, "step.a": 2}, "total": 4}
    assert sum(r["level"] == "CRITICAL" for r in on_disk) == 5
    assert sum(r["level"] == "ERROR" for r in on_disk) == 5
    assert em.stats["dropped"] == 4
    assert [r["seq"] for r in on_disk] == list(range(1, len(on_disk) + 1))  # drops take no seq


def test_flush_reports_drops_without_waiting_for_the_window(path: Path) -> None:
    em = Emitter(path, "r", cfg(batch=50, rate=1), clock=FakeClock())
    em.emit("cli", "x")
    em.emit("cli", "x")
    em.flush()
    assert events(path) == ["x", "telemetry.dropped"]
    assert disk(path)[-1]["attributes"]["dropped"] == {"x": 1}
    em.flush()  # nothing new dropped: no second report
    assert events(path) == ["x", "telemetry.dropped"]


def test_subscribers_see_kept_records_only(path: Path) -> None:
    got: list[str] = []
    em = Emitter(path, "r", cfg(rate=1), clock=FakeClock())
    em.subscribe(lambda r: got.append(r["event"]))
    em.emit("cli", "a")
    em.emit("cli", "b")  # dropped
    em.emit("cli", "c", Level.ERROR)
    em.close()
    assert got == ["a", "c", "telemetry.dropped", "telemetry.closed"]
    assert got == events(path)


# -- E-4 deferral, retries, escalation -----------------------------------------------------------------------

def test_critical_burst_with_failing_writer_loses_nothing(path: Path) -> None:
    opener = FlakyOpener(fail_writes=2)
    em = Emitter(path, "r", cfg(batch=100, retries=3), opener=opener)
    em.emit("tolaria", "info.first")
    for i in range(5):
        em.emit("tolaria", "emergency", Level.CRITICAL, i=i)
    on_disk = disk(path)
    assert [r["event"] for r in on_disk] == ["info.first"] + ["emergency"] * 5
    assert [r["attributes"].get("i") for r in on_disk[1:]] == [0, 1, 2, 3, 4]
    st = em.stats
    assert st["deferred"] == 2  # info.first + emergency 0 were queued when the first write failed
    assert st["retries"] == 2 and st["queued"] == 0 and st["write_errors"] == 0
    assert opener.opens == 3  # the file was re-opened after each failure


def test_critical_beyond_retries_escalates_and_stays_queued(path: Path) -> None:
    opener = FlakyOpener(fail_writes=6)
    em = Emitter(path, "r", cfg(batch=100, retries=1), opener=opener)
    em.emit("tolaria", "info.first")
    with pytest.raises(TelemetryDeliveryError, match="1 CRITICAL"):
        em.emit("tolaria", "emergency", Level.CRITICAL, i=0)
    assert events(path) == []
    assert em.stats["queued"] == 2 and em.stats["deferred"] == 2 and em.stats["write_errors"] == 1
    with pytest.raises(TelemetryDeliveryError, match="2 CRITICAL"):
        em.emit("tolaria", "emergency", Level.CRITICAL, i=1)
    assert em.stats["queued"] == 3 and em.stats["deferred"] == 3
    # A queued CRITICAL keeps flush escalating too: the queue is never cleared unsent.
    em.emit("tolaria", "info.second")
    with pytest.raises(TelemetryDeliveryError, match="2 CRITICAL"):
        em.flush()
    assert opener.fail_left == 0 and events(path) == []
    assert em.stats["queued"] == 4 and em.stats["deferred"] == 4
    em.flush()
    on_disk = disk(path)
    assert [r["event"] for r in on_disk] == ["info.first", "emergency", "emergency", "info.second"]
    assert [r["seq"] for r in on_disk] == [1, 2, 3, 4]
    assert em.stats["queued"] == 0 and em.stats["write_errors"] == 3


def test_deferred_records_go_first_on_next_successful_write(path: Path) -> None:
    opener = FlakyOpener(fail_writes=2)
    em = Emitter(path, "r", cfg(batch=100, retries=1), opener=opener)
    em.emit("tolaria", "a")
    with pytest.raises(TelemetryDeliveryError):
        em.emit("tolaria", "crit", Level.CRITICAL)
    em.emit("tolaria", "b")
    assert events(path) == []
    em.emit("tolaria", "crit2", Level.CRITICAL)
    assert events(path) == ["a", "crit", "b", "crit2"]
    assert [r["seq"] for r in disk(path)] == [1, 2, 3, 4]


def test_failed_batch_write_is_typed_and_keeps_records(path: Path) -> None:
    opener = FlakyOpener(fail_writes=3)
    em = Emitter(path, "r", cfg(batch=2, retries=2), opener=opener)
    em.emit("tolaria", "a")
    with pytest.raises(TelemetryWriteError):
        em.emit("tolaria", "b")
    assert em.stats["queued"] == 2 and em.stats["emitted"]["INFO"] == 2
    em.flush()
    assert events(path) == ["a", "b"]


def test_subscribers_see_a_critical_that_failed_to_write(path: Path) -> None:
    got: list[str] = []
    em = Emitter(path, "r", cfg(retries=0), opener=FlakyOpener(fail_writes=1))
    em.subscribe(lambda r: got.append(r["event"]))
    with pytest.raises(TelemetryDeliveryError):
        em.emit("tolaria", "crit", Level.CRITICAL)
    assert got == ["crit"]


def test_open_failure_is_typed(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="cannot open"):
        Emitter(tmp_path / "missing-dir" / "events.jsonl", "r", cfg())


# -- close ---------------------------------------------------------------------------------------------------

def test_close_writes_stats_record_and_refuses_later_emits(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fsyncs: list[int] = []
    real_fsync = tm.os.fsync
    monkeypatch.setattr(tm.os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    em = Emitter(path, "r", cfg(batch=100))
    em.emit("cli", "a")
    em.emit("cli", "b", Level.ERROR)
    em.close()
    assert len(fsyncs) == 1
    last = disk(path)[-1]
    assert events(path) == ["a", "b", "telemetry.closed"]
    # The stats describe the run up to, not including, the closing record.
    assert last["attributes"]["stats"]["emitted"] == {"INFO": 1, "WARNING": 0, "ERROR": 1, "CRITICAL": 0}
    assert em.stats["emitted"]["INFO"] == 2
    em.close()  # idempotent
    assert events(path) == ["a", "b", "telemetry.closed"]
    with pytest.raises(TelemetryError, match="closed"):
        em.emit("cli", "late")


def test_failed_close_can_be_retried_without_duplicates(path: Path) -> None:
    em = Emitter(path, "r", cfg(retries=0), opener=FlakyOpener(fail_writes=1))
    em.emit("cli", "a")
    with pytest.raises(TelemetryWriteError):
        em.close()
    em.close()
    assert events(path) == ["a", "telemetry.closed"]


# -- O-4 windowed counters -----------------------------------------------------------------------------------

def test_window_counters_reset_lifetime_kept() -> None:
    em = Emitter(None, "r", cfg(rate=2), clock=FakeClock())
    em.emit("cli", "a")
    em.emit("cli", "a")
    em.emit("cli", "a")  # dropped
    em.emit("cli", "c", Level.CRITICAL)
    w1 = em.reset_window()
    assert w1["emitted"] == {"INFO": 2, "WARNING": 0, "ERROR": 0, "CRITICAL": 1}
    assert w1["dropped"] == 1
    em.emit("cli", "e", Level.ERROR)
    w2 = em.reset_window()
    assert w2["emitted"] == {"INFO": 0, "WARNING": 0, "ERROR": 1, "CRITICAL": 0}
    assert w2["dropped"] == 0
    assert em.reset_window()["emitted"] == {"INFO": 0, "WARNING": 0, "ERROR": 0, "CRITICAL": 0}
    assert em.stats["emitted"] == {"INFO": 2, "WARNING": 0, "ERROR": 1, "CRITICAL": 1}
    assert em.stats["dropped"] == 1


def test_in_memory_mode_keeps_records() -> None:
    em = Emitter(None, "r", cfg(batch=1))
    em.emit("cli", "a")
    em.emit("cli", "b", Level.CRITICAL)
    em.close()
    assert [r["event"] for r in em.records] == ["a", "b", "telemetry.closed"]


def test_concurrent_emits_keep_every_record_once(path: Path) -> None:
    em = Emitter(path, "r", cfg(batch=7, rate=100_000))

    def work(n: int) -> None:
        for i in range(150):
            em.emit("kasmina", "prefetch", thread=n, i=i)
            if i % 50 == 0:
                em.emit("kasmina", "prefetch.crit", Level.CRITICAL, thread=n)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    em.close()
    recs = disk(path)
    assert [r["seq"] for r in recs] == list(range(1, 4 * 153 + 2))
    for n in range(4):
        assert [r["attributes"]["i"] for r in recs
                if r["event"] == "prefetch" and r["attributes"]["thread"] == n] == list(range(150))


# -- O-3 reader ----------------------------------------------------------------------------------------------

def _line(seq: int, event: str) -> str:
    rec = {"seq": seq, "utc": "2024-01-01T00:00:00+00:00", "monotonic_ms": 1.0, "run_id": "r", "epoch": 0,
           "step": seq, "source": "cli", "event": event, "level": "INFO", "attributes": {}}
    return json.dumps(rec)


def test_reader_reports_bad_lines_and_keeps_later_good_ones(path: Path) -> None:
    good = [_line(i, f"e{i}") for i in range(1, 6)]
    content = (
        good[0] + "\n"
        + '{"seq": 2, "utc": "garb' + "\n"  # line 2: garbled
        + good[1] + "\n"
        + "[1, 2]\n"  # line 4: valid JSON, not an object
        + good[2] + "\n"
        + '{"seq": 9}\n'  # line 6: missing fields
        + good[3] + "\n"
    ).encode() + b"\xff\xfe\n" + (good[4] + "\n" + good[0][:25]).encode()  # line 8 not UTF-8; 10 torn
    path.write_bytes(content)
    result = read_events(path)
    assert [r["event"] for r in result.records] == ["e1", "e2", "e3", "e4", "e5"]
    assert [p.split(":")[0].split(" (")[0] for p in result.problems] == [
        "line 2", "line 4", "line 6", "line 8", "line 10"]
    assert "not valid JSON" in result.problems[0]
    assert "not a JSON object" in result.problems[1]
    assert "missing field" in result.problems[2]
    assert "not UTF-8" in result.problems[3]
    assert "torn" in result.problems[4]


def test_reader_clean_file_and_complete_last_line_without_newline(path: Path) -> None:
    path.write_text(_line(1, "a") + "\n" + _line(2, "b"), encoding="utf-8")
    result = read_events(path)
    assert [r["event"] for r in result.records] == ["a", "b"] and result.problems == []


def test_reader_on_a_torn_emitter_file(path: Path) -> None:
    em = Emitter(path, "r", cfg(batch=1))
    for i in range(3):
        em.emit("tolaria", "step", i=i)
    em.close()
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # crash mid-write of the closing record
    result = read_events(path)
    assert [r["attributes"]["i"] for r in result.records] == [0, 1, 2]
    assert len(result.problems) == 1 and result.problems[0].startswith("line 4")


def test_reader_missing_file_is_typed(tmp_path: Path) -> None:
    with pytest.raises(TelemetryError, match="cannot read"):
        read_events(tmp_path / "nope.jsonl")


def test_module_does_not_import_torch() -> None:
    code = "import sys, esper.core.records.telemetry; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


_FSIZE = """
import resource, signal, sys
from pathlib import Path
from esper.core.config import TelemetryConfig
from esper.core.errors import EsperError
from esper.core.records.telemetry import Emitter

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit a write fails with EFBIG instead of a signal
path = Path(sys.argv[1])
em = Emitter(path, "run-1", TelemetryConfig(batch_size=1, critical_retries=1))
em.emit("cli", "first", "CRITICAL", pad="x" * 100)
size = path.stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 150, resource.RLIM_INFINITY))  # the next record is torn
try:
    em.emit("cli", "second", "CRITICAL", pad="y" * 400)
except EsperError as exc:
    print(type(exc).__name__)
"""


def test_a_record_torn_by_the_file_size_limit_is_cut_back_not_left_in_the_log(tmp_path: Path) -> None:
    """Issue 26: a record torn part-way (the file-size limit, a full disk) stayed in events.jsonl after the halt."""
    path = tmp_path / "events.jsonl"
    done = subprocess.run([sys.executable, "-c", _FSIZE, str(path)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "TelemetryDeliveryError", done.stderr
    data = path.read_bytes()
    assert data.endswith(b"\n") and data.count(b"\n") == 1  # the whole first record, nothing of the torn one
    assert [e["event"] for e in disk(path)] == ["first"]
