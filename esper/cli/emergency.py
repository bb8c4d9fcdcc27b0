"""`esper emergency clear RUN --reason TEXT`: an operator's downgrade of a running run (L-4).

The request goes through the run directory (``esper.core.records.requests``); the running trainer applies it at its
next step boundary through the emergency table's own ``clear`` transition and answers in ``events.jsonl``. This
command waits for that answer and reports it.

Exit codes: 0 applied; 5 not applied (the level was NOMINAL, the run is not running or ended first, or it did
not pick the request up within ``--wait``: the request is then withdrawn); 2 for a path that is not a run.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer

from esper.cli.common import JsonOpt, handle_errors, print_json, stdout
from esper.core.errors import EsperError, ExitCode, UsageError
from esper.core.io import jsonl
from esper.core.records import requests
from esper.core.records.runlock import writer_alive

app = typer.Typer(help="Act on a running run's emergency level.", no_args_is_help=True)

_POLL_S = 0.05  # how often the answer is looked for: a CLI waiting on another process, not a test


class NotApplied(EsperError):
    """The request was not applied (rejected by the run, or the run could not take it)."""

    exit_code = ExitCode.ILLEGAL


@app.callback()
def _group() -> None:
    """Operator actions on a running run, delivered through its run directory."""


@app.command("clear")
@handle_errors
def clear(
    run: Annotated[Path, typer.Argument(help="The running run's directory.", show_default=False)],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded with the transition).", show_default=False)],
    wait: Annotated[float, typer.Option("--wait", min=0.1, max=3600.0, help="Seconds to wait for the run's answer.")
                    ] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Clear the emergency level of a running run to NOMINAL (the table's `clear`), recorded like every change."""
    if not (run / "events.jsonl").is_file() or not (run / "config.toml").is_file():
        raise UsageError(f"{run} is not a run directory (no events.jsonl and config.toml)", key="RUN")
    if not reason.strip():
        raise UsageError("--reason must say why", key="--reason")
    if not writer_alive(run):
        raise NotApplied(f"run {run} is not running (no process holds its writer lock): there is nothing to clear; "
                         "a stopped run resumes with its level as the checkpoint recorded it")
    run_id = _run_id(run)
    tail = jsonl.Tail(run / "events.jsonl", from_end=True)  # the answer comes after the request
    request = requests.new_request("emergency.clear", run_id, reason.strip())
    path = requests.deliver(run, request)
    answer = _await(run, tail, request.request_id, path, wait)
    if answer["outcome"] != "applied":  # with --json, the one error document says it
        raise NotApplied(f"emergency clear not applied to {run} (request {request.request_id}, "
                         f"{answer['outcome']}): {answer['detail']}")
    if as_json:
        print_json({"run": str(run), "request_id": request.request_id, **answer})
    else:
        stdout().print(f"cleared: run {run_id} {answer['level_before']} -> {answer['level_after']} "
                       f"(request {request.request_id})", highlight=False, markup=False)


def _await(run: Path, tail: jsonl.Tail, request_id: str, path: Path, wait: float) -> dict[str, Any]:
    deadline = time.monotonic() + wait
    while True:
        answer = _answer(tail, request_id)
        if answer is not None:
            return answer
        alive = writer_alive(run)
        if not alive or time.monotonic() > deadline:
            if requests.withdraw(path):
                detail = ("the run ended before it took the request" if not alive else
                          f"the run did not take the request within {wait:g} s (a long step?)")
                return _outcome("not_running" if not alive else "timeout", detail + "; it was withdrawn")
            if not alive:  # taken, then the run ended: its answer is on disk or was never written
                return _answer(tail, request_id) or _outcome("lost", "the run took the request but ended before "
                                                             "answering; see its events.jsonl")
            # taken by a live run: the answer is written in the same step
        time.sleep(_POLL_S)


def _answer(tail: jsonl.Tail, request_id: str) -> dict[str, Any] | None:
    for line in tail.new():
        attrs = line.record.get("attributes")
        if line.record.get("event") == requests.EVENT and isinstance(attrs, dict) \
                and attrs.get("request_id") == request_id:
            return {"outcome": attrs.get("outcome"), "detail": attrs.get("detail", ""),
                    "level_before": attrs.get("level_before"), "level_after": attrs.get("level_after")}
    return None


def _outcome(outcome: str, detail: str) -> dict[str, Any]:
    return {"outcome": outcome, "detail": detail, "level_before": None, "level_after": None}


def _run_id(run: Path) -> str:
    for line in jsonl.Tail(run / "events.jsonl").new():
        if isinstance(line.record.get("run_id"), str):
            return str(line.record["run_id"])
    raise UsageError(f"{run}/events.jsonl names no run id", key="RUN")
