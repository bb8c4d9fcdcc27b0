"""The worker process's end of the controller pipe (``controller.isolation = "process"``).

Tolaria's mediator (``esper.core.tolaria.mediator``) starts a child with :func:`child_main` as its target and
owns the other end. Messages are ``[request_id, kind, body]`` lists sent as JSON bytes (never pickle), one per
``send_bytes``, so payloads and replies must be JSON-able. The controller state lives in the parent: a request
carries it in and the reply carries the new state out, so a killed and restarted child loses nothing.

No torch here: importing it would add seconds to every restart of the child.
"""

from __future__ import annotations

import json
import multiprocessing.connection
import os
import signal
import traceback
from typing import Any

from esper.core.config.plugins import load_factory
from esper.core.errors import EsperError

CONFIG_KEY = "controller.policy"


class WireError(EsperError):
    """A message that cannot cross the pipe (not JSON-able) or is not a well-formed message."""


def encode(message: list[Any]) -> bytes:
    try:
        return json.dumps(message, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise WireError(f"controller message is not JSON-able: {exc}") from exc


def decode(raw: bytes) -> list[Any]:
    message = json.loads(raw.decode("utf-8"))
    if not isinstance(message, list) or len(message) != 3:
        raise WireError(f"malformed controller message: {raw[:200]!r}")
    return message


def child_main(conn: multiprocessing.connection.Connection, factory_ref: str, args_json: str) -> None:
    """Entry point of the worker process: build the controller, then answer requests until EOF."""
    # a Ctrl-C or a `kill -TERM -PGID` reaches the whole process group: the trainer decides what it means (a
    # graceful stop that may still ask this worker) and ends the worker itself (EOF on the pipe, or the
    # mediator's kill after its grace)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        controller = load_factory(factory_ref, CONFIG_KEY)(**json.loads(args_json))
    except Exception:  # noqa: BLE001 -- not swallowed: sent to the parent, which raises ControllerCrashed
        conn.send_bytes(encode(["", "init_error", traceback.format_exc()]))
        return
    conn.send_bytes(encode(["", "ready", os.getpid()]))
    while True:
        try:
            raw = conn.recv_bytes()
        except EOFError:  # the parent closed its end: that is the shutdown signal
            return
        request_id, method, payload = decode(raw)
        try:
            handler = getattr(controller, method) if not method.startswith("_") else None
            if handler is None or not callable(handler):
                raise AttributeError(f"controller {type(controller).__name__} has no method {method!r}")
            reply: list[Any] = [request_id, "ok", handler(payload)]
            encoded = encode(reply)
        except Exception:  # noqa: BLE001 -- not swallowed: sent to the parent, which raises ControllerCrashed
            encoded = encode([request_id, "error", traceback.format_exc()])
        conn.send_bytes(encoded)
