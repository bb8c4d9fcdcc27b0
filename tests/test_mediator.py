"""The mediator and controller isolation (SPEC T-7): deadlines, late results, restarts, no leftovers."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import fake_controllers
import pytest
from conftest import EventRecorder, make_config, wait_until

from esper.core.errors import EsperError
from esper.core.tolaria.mediator import (
    ControllerCrashed,
    ControllerTimeout,
    ControllerWorker,
    InlineController,
    Mediator,
    MediatorError,
    open_controller,
)

MOD = fake_controllers.__name__
COUNTER = f"{MOD}:make_counter"
START_MS = make_config().controller.start_timeout_ms  # what a run passes: the config schema's default


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_no_leftovers(pids: list[int], baseline_threads: set[threading.Thread]) -> None:
    assert multiprocessing.active_children() == []
    assert all(_pid_gone(pid) for pid in pids), pids
    assert not set(threading.enumerate()) - baseline_threads  # no new thread left (older ones may end)


# -- process worker (each spawn costs ~0.5 s: few tests, each covering a path) --------------------------


def test_worker_decides_reports_crash_and_closes_cleanly() -> None:
    baseline = set(threading.enumerate())
    rec = EventRecorder()
    worker = ControllerWorker(COUNTER, {"step": 2})
    mediator = Mediator(timeout_ms=5000, emit=rec, controller=worker)

    reply = mediator.decide("decide", {"count": 1})
    pid = worker.pid
    assert reply["count"] == 3
    assert pid is not None and reply["pid"] == pid and pid != os.getpid()
    [event] = rec.named("controller_decision")
    assert event["timeout"] is False and event["latency_ms"] >= 0 and event["restarts"] == 0
    assert rec.events[0].source == "tolaria"

    with pytest.raises(ControllerCrashed) as info:
        mediator.decide("boom", {"x": 1})
    assert "RuntimeError: controller exploded" in info.value.child_traceback
    assert isinstance(info.value, EsperError)
    assert rec.named("controller_crash")[0]["timeout"] is False
    # a controller exception is not a hang: the same child keeps serving
    assert mediator.decide("decide", {"count": 10})["count"] == 12 and worker.pid == pid

    with pytest.raises(ControllerCrashed, match="no method"):
        mediator.decide("_private", {})

    mediator.close()
    _assert_no_leftovers([pid], baseline)
    with pytest.raises(MediatorError, match="closed"):
        worker.request("decide", {"count": 0}, "r-1", 1000)
    assert multiprocessing.active_children() == []


def test_timeout_kills_child_discards_late_result_and_restarts_fresh() -> None:
    baseline = set(threading.enumerate())
    rec = EventRecorder()
    worker = ControllerWorker(COUNTER, {}, kill_grace_s=1.5)
    mediator = Mediator(timeout_ms=100, emit=rec, controller=worker)
    worker.start()
    first = worker.pid
    assert first is not None

    # the child answers only once terminated (after the deadline), within the grace before the kill
    with pytest.raises(ControllerTimeout):
        mediator.decide("late", {})
    assert worker.pid is None and _pid_gone(first)
    assert worker.late_discarded == 1
    [timeout_event] = rec.named("controller_timeout")
    assert timeout_event["timeout"] is True and timeout_event["late_discarded"] == 1

    # the next request starts a fresh child and gets its own answer (never the late one)
    reply = mediator.decide("decide", {"count": 5}, deadline_ms=10_000)
    second = worker.pid
    assert reply == {"count": 6, "pid": second}
    assert second is not None and second != first and worker.restarts == 1

    # a controller that never answers is terminated the same way
    with pytest.raises(ControllerTimeout):
        mediator.decide("hang", {}, deadline_ms=200)
    assert _pid_gone(second)

    worker.close()
    _assert_no_leftovers([first, second], baseline)
    assert rec.named("controller_decision")[-1]["restarts"] == 1


def test_worker_factory_failure_is_a_crash_with_the_child_traceback() -> None:
    worker = ControllerWorker(f"{MOD}:make_broken", {})
    with pytest.raises(ControllerCrashed) as info:
        worker.start()
    assert "factory refuses to build" in info.value.child_traceback
    assert worker.pid is None
    worker.close()
    assert multiprocessing.active_children() == []


def test_unclosed_worker_does_not_outlive_the_parent(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(Path(fake_controllers.__file__).parent)!r})
        from esper.core.tolaria.mediator import ControllerWorker
        w = ControllerWorker({COUNTER!r}, {{}})
        w.start()
        print(w.pid, flush=True)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    pid = int(out.stdout.strip())
    wait_until(lambda: _pid_gone(pid), "the orphaned worker to exit", 5)


def test_payload_must_be_json_before_any_child_starts() -> None:
    worker = ControllerWorker(COUNTER, {})
    with pytest.raises(MediatorError, match="JSON"):
        worker.request("decide", {"count": object()}, "r-1", 1000)
    with pytest.raises(MediatorError, match="JSON"):
        worker.request("decide", {"count": float("nan")}, "r-1", 1000)
    assert worker.pid is None and multiprocessing.active_children() == []
    with pytest.raises(MediatorError, match="module:function"):
        ControllerWorker("no_colon_here")
    with pytest.raises(MediatorError, match="JSON"):
        ControllerWorker(COUNTER, {"bad": {1, 2}})
    worker.close()


# -- inline endpoint ---------------------------------------------------------------------------------------


def test_inline_controller_same_interface_and_discards_over_budget_results() -> None:
    rec = EventRecorder()
    endpoint = open_controller("inline", f"{MOD}:make_inline", {"step": 3}, start_timeout_ms=START_MS)
    assert isinstance(endpoint, InlineController)
    mediator = Mediator(timeout_ms=1000, emit=rec, controller=endpoint)
    payload = {"count": 1}
    assert mediator.decide("decide", payload) == {"count": 4, "pid": os.getpid()}
    assert payload == {"count": 1}

    with pytest.raises(ControllerTimeout, match="discarded"):
        mediator.decide("nap", {"seconds": 0.05}, deadline_ms=10)
    assert endpoint.late_discarded == 1 and rec.named("controller_timeout")[0]["late_discarded"] == 1

    with pytest.raises(ControllerCrashed) as info:
        mediator.decide("boom", {})
    assert "controller exploded" in info.value.child_traceback

    mediator.close()
    with pytest.raises(MediatorError, match="closed"):
        mediator.decide("decide", payload)


def test_inline_factory_failure_and_bad_isolation() -> None:
    with pytest.raises(ControllerCrashed, match="failed to start"):
        InlineController(f"{MOD}:make_broken").request("decide", {}, "r", 100)
    with pytest.raises(MediatorError, match="isolation"):
        open_controller("thread", COUNTER, start_timeout_ms=START_MS)  # type: ignore[arg-type]


def test_decide_without_controller_is_an_error() -> None:
    with pytest.raises(MediatorError, match="no controller"):
        Mediator().decide("decide", {})
    with pytest.raises(MediatorError):
        Mediator(timeout_ms=0)


def test_request_ids_are_unique() -> None:
    a, b = Mediator(), Mediator()
    ids = [a.next_request_id() for _ in range(100)] + [b.next_request_id() for _ in range(100)]
    assert len(set(ids)) == 200


# -- start-up is reported apart from the decision (issue 12 §10) -------------------------------------------


def test_inline_start_up_is_neither_charged_to_nor_hidden_from_the_first_decision() -> None:
    rec = EventRecorder()
    endpoint = open_controller("inline", f"{MOD}:make_slow_start", {"seconds": 0.3}, start_timeout_ms=START_MS)
    mediator = Mediator(timeout_ms=1000, emit=rec, controller=endpoint)
    # The start-up alone is longer than the deadline: the decision is not a timeout, and its start-up is said.
    assert mediator.decide("decide", {"count": 1}, deadline_ms=100)["count"] == 2
    assert mediator.decide("decide", {"count": 1}, deadline_ms=100)["count"] == 2
    first, second = rec.named("controller_decision")
    assert first["timeout"] is False and first["startup_ms"] >= 300 and first["deadline_ms"] == 100
    assert first["latency_ms"] < first["startup_ms"]  # the start-up is not inside the decision's latency
    assert second["startup_ms"] == 0
    mediator.close()


def test_worker_start_up_longer_than_the_deadline_is_reported_not_a_timeout() -> None:
    baseline = set(threading.enumerate())
    rec = EventRecorder()
    worker = ControllerWorker(f"{MOD}:make_slow_start", {"seconds": 1.5})
    mediator = Mediator(timeout_ms=1000, emit=rec, controller=worker)
    assert mediator.decide("decide", {"count": 1})["count"] == 2
    pid = worker.pid
    assert mediator.decide("decide", {"count": 2})["count"] == 3
    first, second = rec.named("controller_decision")
    assert first["timeout"] is False and first["startup_ms"] >= 1500 > first["deadline_ms"]
    assert first["latency_ms"] < first["startup_ms"] and second["startup_ms"] == 0
    mediator.close()
    assert pid is not None
    _assert_no_leftovers([pid], baseline)


def test_a_worker_that_starts_slower_than_controller_start_timeout_ms_is_a_controller_timeout() -> None:
    cfg = make_config("controller.start_timeout_ms=300")
    endpoint = open_controller("process", f"{MOD}:make_slow_start", {"seconds": 5.0},
                               start_timeout_ms=cfg.controller.start_timeout_ms)
    rec = EventRecorder()
    mediator = Mediator(timeout_ms=1000, emit=rec, controller=endpoint)
    try:
        with pytest.raises(ControllerTimeout, match=r"did not start within 0\.3s"):
            mediator.decide("decide", {"count": 1})
    finally:
        mediator.close()
