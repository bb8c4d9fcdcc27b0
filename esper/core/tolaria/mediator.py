"""The one mediator for every call Tolaria makes into Tamiyo, the controller (SPEC T-7).

Deadlines, cancellation and latency/timeout telemetry live here and nowhere else (Tolaria arch 1, Tamiyo
arch 2). A controller runs behind a :class:`ControllerEndpoint`:

* :class:`ControllerWorker` (``controller.isolation = "process"``) runs the controller in a child process
  started with the ``spawn`` context (the parent holds torch threads, so it must never fork); the child's end
  of the pipe is ``esper.core.tamiyo.pipe``. A decision over its budget is abandoned for real: the child is
  terminated, then killed, and the next request starts a fresh one. Every reply carries the id of its request;
  a reply for any other id is a late result and is discarded and counted, never returned (Tamiyo #18, #19).
* :class:`InlineController` (``"inline"``) calls the controller in-process. A hung decision hangs the caller,
  so it cannot enforce a deadline: an over-budget result is discarded after the fact. Tests/benchmarks only.

The controller's state stays in the parent: each request carries it in and the reply carries the new state
out, so a restarted child needs nothing.
"""

from __future__ import annotations

import atexit
import itertools
import json
import multiprocessing
import multiprocessing.connection
import threading
import time
import traceback
import uuid
import weakref
from collections.abc import Callable
from typing import Any, Literal, Protocol

from esper.core.config.plugins import load_factory
from esper.core.errors import EsperError
from esper.core.tamiyo import pipe

Emit = Callable[..., Any]
Json = dict[str, Any]  # a JSON object: what crosses the pipe

SOURCE = "tolaria"


class MediatorError(EsperError):
    """A mediated call could not be made (no controller attached, worker closed, bad reply)."""


class ControllerTimeout(MediatorError):
    """A controller decision ran past ``controller.timeout_ms``; it is abandoned (→ CONSERVATIVE)."""


class ControllerCrashed(MediatorError):
    """The controller raised or its process died; ``child_traceback`` holds the child's traceback text."""

    def __init__(self, message: str, child_traceback: str = "") -> None:
        super().__init__(message if not child_traceback else f"{message}\n{child_traceback}")
        self.child_traceback = child_traceback


def _encode(message: list[Any]) -> bytes:
    try:
        return pipe.encode(message)
    except pipe.WireError as exc:
        raise MediatorError(str(exc)) from exc


def _decode(raw: bytes) -> list[Any]:
    try:
        return pipe.decode(raw)
    except pipe.WireError as exc:
        raise MediatorError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------
# endpoints


class ControllerEndpoint(Protocol):
    """What the mediator needs from a controller host (process worker or inline)."""

    restarts: int
    late_discarded: int
    startup_ms: float  # start-up time of the last request (0 when none was needed): reported, never budgeted

    def request(self, method: str, payload: Json, request_id: str, timeout_ms: int) -> Json:
        """Run ``controller.<method>(payload)`` under ``timeout_ms``; return its reply."""
        ...

    def close(self) -> None:
        """Release the controller; idempotent."""
        ...


_LIVE_WORKERS: weakref.WeakSet[ControllerWorker] = weakref.WeakSet()


def _close_live_workers() -> None:
    # a worker the caller forgot to close must not outlive the parent
    for worker in list(_LIVE_WORKERS):
        worker.close()


atexit.register(_close_live_workers)


class ControllerWorker:
    """A controller in a child process that can be abandoned for real (``controller.isolation = "process"``).

    ``factory_ref`` is ``module:function``; the child imports it and calls it with the JSON-able
    ``factory_args`` to build the controller. The child starts on the first request (or :meth:`start`);
    start-up time is bounded by ``start_timeout_ms`` and does not count against a decision's budget.
    """

    def __init__(self, factory_ref: str, factory_args: dict[str, Any] | None = None, *,
                 start_timeout_ms: int = 30_000, kill_grace_s: float = 0.5) -> None:
        if ":" not in factory_ref:
            raise MediatorError(f"controller factory must be 'module:function', got {factory_ref!r}")
        self.factory_ref = factory_ref
        self._args_json = _encode_args(factory_args or {})
        self.start_timeout_ms = start_timeout_ms
        self.kill_grace_s = kill_grace_s
        self._ctx = multiprocessing.get_context("spawn")
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._lock = threading.Lock()  # one request at a time: replies are matched to the current id
        self._closed = False
        self._started_once = False
        self.restarts = 0
        self.late_discarded = 0
        self.last_startup_ms = 0.0
        self.startup_ms = 0.0
        _LIVE_WORKERS.add(self)

    @property
    def pid(self) -> int | None:
        """The live child's pid, or None when no child is running."""
        return self._process.pid if self._process is not None and self._process.is_alive() else None

    def start(self) -> None:
        """Start the child now (otherwise the first request does)."""
        with self._lock:
            self._ensure_child()

    def request(self, method: str, payload: Json, request_id: str, timeout_ms: int) -> Json:
        """Send ``(request_id, method, payload)``; wait up to ``timeout_ms`` for the reply with that id.

        Raises ControllerTimeout (the child is killed; the next request starts a fresh one) or
        ControllerCrashed (the controller raised, or its process died).
        """
        if not request_id:
            raise MediatorError("a controller request needs a non-empty request id")
        message = _encode([request_id, method, payload])
        with self._lock:
            self.startup_ms = 0.0
            self._ensure_child()
            return self._exchange(message, request_id, timeout_ms / 1000.0, f"{method}[{request_id}]")

    def close(self) -> None:
        """Terminate the child and join it; idempotent, and safe at interpreter exit."""
        with self._lock:
            self._closed = True
            self._kill_child()
        _LIVE_WORKERS.discard(self)

    def __enter__(self) -> ControllerWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals (called with self._lock held) -----------------------------------------------------------

    def _ensure_child(self) -> None:
        if self._closed:
            raise MediatorError("controller worker is closed")
        if self._process is not None and self._process.is_alive():
            return
        if self._process is not None:  # it died between requests (crash or kill): reap it before replacing
            self._kill_child()
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(target=pipe.child_main, args=(child_conn, self.factory_ref, self._args_json),
                                    name="esper-controller", daemon=True)
        t0 = time.perf_counter()
        process.start()
        child_conn.close()  # only the child holds its end, so our recv sees EOF when it dies
        self._process, self._conn = process, parent_conn
        if self._started_once:
            self.restarts += 1
        self._started_once = True
        kind, body = self._await_ready(self.start_timeout_ms / 1000.0)
        if kind != "ready":
            self._kill_child()
            raise ControllerCrashed(f"controller {self.factory_ref!r} failed to start", str(body))
        self.last_startup_ms = (time.perf_counter() - t0) * 1000.0
        self.startup_ms = self.last_startup_ms

    def _await_ready(self, timeout_s: float) -> tuple[str, Any]:
        assert self._conn is not None and self._process is not None
        ready = multiprocessing.connection.wait([self._conn, self._process.sentinel], timeout_s)
        if not ready:
            self._kill_child()
            raise ControllerTimeout(f"controller {self.factory_ref!r} did not start within {timeout_s:.1f}s")
        message = self._recv()
        if message is None:
            code = self._process.exitcode
            self._kill_child()
            raise ControllerCrashed(f"controller process exited during start-up (exit code {code})")
        _, kind, body = message
        return kind, body

    def _exchange(self, message: bytes, request_id: str, timeout_s: float, label: str) -> dict[str, Any]:
        assert self._conn is not None and self._process is not None
        try:
            self._conn.send_bytes(message)
        except (BrokenPipeError, ConnectionResetError, OSError) as exc:
            self._kill_child()
            raise ControllerCrashed(f"controller process is gone ({exc}); {label} not delivered") from exc
        deadline = time.monotonic() + timeout_s
        while True:
            remaining = deadline - time.monotonic()
            ready = remaining > 0 and multiprocessing.connection.wait(
                [self._conn, self._process.sentinel], remaining)
            if not ready:
                self._kill_child()
                raise ControllerTimeout(f"controller {label} exceeded {timeout_s * 1000:.0f} ms; abandoned")
            message_in = self._recv()
            if message_in is None:
                code = self._process.exitcode
                self._kill_child()
                raise ControllerCrashed(f"controller process died during {label} (exit code {code})")
            reply_id, kind, body = message_in
            if reply_id != request_id:
                self.late_discarded += 1  # a result for an abandoned request: never applied
                continue
            if kind == "error":
                raise ControllerCrashed(f"controller raised during {label}", str(body))
            if kind != "ok":
                raise MediatorError(f"unexpected controller reply kind {kind!r} for {label}")
            if not isinstance(body, dict):
                raise ControllerCrashed(f"controller {label} returned {type(body).__name__}, expected a dict")
            return body

    def _recv(self) -> list[Any] | None:
        """The next message, or None when the child end is closed (process gone)."""
        assert self._conn is not None
        if not self._conn.poll(0):
            return None  # woken by the process sentinel with nothing to read: it died
        try:
            return _decode(self._conn.recv_bytes())
        except (EOFError, OSError):
            return None

    def _kill_child(self) -> None:
        process, conn = self._process, self._conn
        self._process, self._conn = None, None
        if process is not None:
            if process.is_alive():
                process.terminate()
                process.join(self.kill_grace_s)
            if process.is_alive():  # ignored SIGTERM (or is stuck in C code): no more grace
                process.kill()
            process.join()
            process.close()
        if conn is not None:
            # replies that landed before the child died answer abandoned requests: count and drop them
            while True:
                try:
                    if not conn.poll(0):
                        break
                    conn.recv_bytes()
                except (EOFError, OSError):
                    break
                self.late_discarded += 1
            conn.close()


def _encode_args(args: dict[str, Any]) -> str:
    try:
        return json.dumps(args, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise MediatorError(f"controller factory arguments are not JSON-able: {exc}") from exc


class InlineController:
    """The controller called in-process (``controller.isolation = "inline"``); for tests and benchmarks only.

    Same interface as :class:`ControllerWorker`, but nothing can stop a hung decision: a result that arrives
    over budget is discarded (ControllerTimeout) only after the call returns.
    """

    def __init__(self, factory_ref: str, factory_args: dict[str, Any] | None = None) -> None:
        self.factory_ref = factory_ref
        self._args_json = _encode_args(factory_args or {})
        self._controller: Any = None
        self._lock = threading.Lock()
        self._closed = False
        self.restarts = 0  # always 0: an in-process controller is never replaced
        self.late_discarded = 0
        self.startup_ms = 0.0

    def request(self, method: str, payload: Json, request_id: str, timeout_ms: int) -> Json:
        """Run the method in-process; a result later than ``timeout_ms`` is discarded (ControllerTimeout)."""
        # the round trip through JSON keeps inline and process semantics identical (no shared mutable state)
        wire_payload = _decode(_encode([request_id, method, payload]))[2]
        label = f"{method}[{request_id}]"
        with self._lock:
            if self._closed:
                raise MediatorError("controller is closed")
            self.startup_ms = 0.0
            if self._controller is None:
                t_build = time.perf_counter()
                self._build()
                self.startup_ms = (time.perf_counter() - t_build) * 1000.0
            t0 = time.perf_counter()
            reply = self._call(method, wire_payload, label)
            elapsed_ms = (time.perf_counter() - t0) * 1000.0
        if elapsed_ms > timeout_ms:
            self.late_discarded += 1
            raise ControllerTimeout(
                f"controller {label} took {elapsed_ms:.0f} ms > {timeout_ms} ms; result discarded")
        return reply

    def close(self) -> None:
        """Drop the controller; idempotent."""
        with self._lock:
            self._closed = True
            self._controller = None

    def _build(self) -> None:
        try:
            self._controller = load_factory(self.factory_ref, pipe.CONFIG_KEY)(**json.loads(self._args_json))
        except EsperError:
            raise
        except Exception as exc:  # noqa: BLE001 -- re-raised typed, as the process worker would report it
            raise ControllerCrashed(f"controller {self.factory_ref!r} failed to start",
                                    traceback.format_exc()) from exc

    def _call(self, method: str, payload: dict[str, Any], label: str) -> dict[str, Any]:
        handler = getattr(self._controller, method, None) if not method.startswith("_") else None
        if handler is None or not callable(handler):
            raise ControllerCrashed(f"controller {type(self._controller).__name__} has no method {method!r}")
        try:
            reply = handler(payload)
            _encode([label, "ok", reply])
        except Exception as exc:  # noqa: BLE001 -- re-raised typed with the traceback, like the process path
            raise ControllerCrashed(f"controller raised during {label}", traceback.format_exc()) from exc
        if not isinstance(reply, dict):
            raise ControllerCrashed(f"controller {label} returned {type(reply).__name__}, expected a dict")
        return reply


def open_controller(isolation: Literal["process", "inline"], factory_ref: str,
                    factory_args: dict[str, Any] | None = None, *,
                    start_timeout_ms: int) -> ControllerWorker | InlineController:
    """The endpoint ``controller.isolation`` asks for; ``start_timeout_ms`` (``controller.start_timeout_ms``)
    bounds a worker process's start (an inline controller starts in this process, unbounded)."""
    if isolation == "process":
        return ControllerWorker(factory_ref, factory_args, start_timeout_ms=start_timeout_ms)
    if isolation == "inline":
        return InlineController(factory_ref, factory_args)
    raise MediatorError(f"unknown controller isolation {isolation!r} (process | inline)")


# ----------------------------------------------------------------------------------------------------------
# the mediator


class Mediator:
    """Every trainer call into the controller goes through here: deadline, ids, telemetry.

    ``emit(source, event, level, **attributes)`` receives one event per decision (source ``tolaria``):
    ``controller_decision`` / ``controller_timeout`` / ``controller_crash`` / ``controller_call_failed``, each
    with ``latency_ms``, ``timeout``, ``request_id``, ``restarts`` and ``late_discarded``. A decision that had to
    start the worker first (the first one, or the one after a kill) also reports ``startup_ms``: start-up is
    measured apart and never charged to the decision's budget or hidden in its ``latency_ms``.

    (Kasmina's blueprint loads have their own deadline in the load manager, the one place they are cut short.)
    """

    def __init__(self, timeout_ms: int = 2000, emit: Emit | None = None, *,
                 controller: ControllerEndpoint | None = None) -> None:
        if timeout_ms < 1:
            raise MediatorError(f"timeout_ms must be >= 1, got {timeout_ms}")
        self.timeout_ms = timeout_ms
        self._emit = emit
        self._controller = controller
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]  # ids stay unique across mediators sharing a worker

    @property
    def controller(self) -> ControllerEndpoint | None:
        """The attached controller endpoint, if any."""
        return self._controller

    def next_request_id(self) -> str:
        """A fresh decision id; the reply must carry it to be applied."""
        return f"{self._prefix}-{next(self._ids)}"

    def decide(self, method: str, payload: Json, *, deadline_ms: int | None = None) -> Json:
        """Ask the controller (``controller.<method>(payload)``) under the decision budget.

        Raises ControllerTimeout or ControllerCrashed; both are failures the trainer escalates to
        CONSERVATIVE (SPEC T-7), never a pause command.
        """
        if self._controller is None:
            raise MediatorError("no controller attached to the mediator")
        budget = self.timeout_ms if deadline_ms is None else deadline_ms
        request_id = self.next_request_id()
        endpoint = self._controller
        t0 = time.perf_counter()
        try:
            reply = endpoint.request(method, payload, request_id, budget)
        except ControllerTimeout as exc:
            self._send("controller_timeout", "WARNING", method=method, request_id=request_id,
                       **_timing(t0, endpoint), timeout=True, deadline_ms=budget, restarts=endpoint.restarts,
                       late_discarded=endpoint.late_discarded, reason=str(exc))
            raise
        except ControllerCrashed as exc:
            self._send("controller_crash", "ERROR", method=method, request_id=request_id,
                       **_timing(t0, endpoint), timeout=False, deadline_ms=budget, restarts=endpoint.restarts,
                       late_discarded=endpoint.late_discarded, reason=str(exc).splitlines()[0])
            raise
        except MediatorError as exc:
            self._send("controller_call_failed", "ERROR", method=method, request_id=request_id,
                       **_timing(t0, endpoint), timeout=False, deadline_ms=budget, reason=str(exc))
            raise
        self._send("controller_decision", "INFO", method=method, request_id=request_id, **_timing(t0, endpoint),
                   timeout=False, deadline_ms=budget, restarts=endpoint.restarts,
                   late_discarded=endpoint.late_discarded)
        return reply

    def close(self) -> None:
        """Close the attached controller (kills its worker process)."""
        if self._controller is not None:
            self._controller.close()

    def _send(self, event: str, level: str, **attributes: Any) -> None:
        if self._emit is not None:
            self._emit(SOURCE, event, level, **attributes)


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


def _timing(t0: float, endpoint: ControllerEndpoint) -> dict[str, float]:
    """``latency_ms`` of the decision itself and, apart from it, ``startup_ms`` of a worker it had to start."""
    startup = float(getattr(endpoint, "startup_ms", 0.0))
    return {"latency_ms": max(0.0, _ms(t0) - startup), "startup_ms": startup}
