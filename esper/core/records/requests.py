"""Operator requests to a running run, delivered through its run directory (L-4: ``esper emergency clear``).

The requester (the CLI, another process) writes one small JSON file into ``RUN/requests/`` (a temp name, then a
rename, so the trainer never sees half a request); the trainer, which holds the run's writer lock, looks at the
directory at every step boundary, takes each request (the file is removed), applies it and answers with an
``operator.request`` event (source ``cli``) carrying the request id and the outcome.

A request is outside input, so it is built to be harmless: it is read bounded and schema-checked, must name the
run it is for, and can only ask for the emergency table's own ``clear`` transition, which lowers the level and is
recorded like every other change (a CRITICAL ``emergency.level`` event, the level history). A forged request can
therefore do no more than the operator command itself, in the open. Requests found when a run starts were written
for an earlier process: each is removed and reported as stale, never applied.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from esper.core.io import bounded, confine

DIRNAME = "requests"
MAX_REQUEST_BYTES = 4096
EVENT = "operator.request"


class Request(BaseModel):
    """One operator request, as the file holds it."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    kind: Literal["emergency.clear"]
    run_id: str = Field(min_length=1, max_length=128)
    request_id: str = Field(pattern=r"^req-[0-9a-f]{16}$")
    reason: str = Field(min_length=1, max_length=500)
    utc: str = Field(max_length=64)


def new_request(kind: Literal["emergency.clear"], run_id: str, reason: str) -> Request:
    return Request(kind=kind, run_id=run_id, request_id=f"req-{secrets.token_hex(8)}", reason=reason,
                   utc=datetime.now(UTC).isoformat())


def deliver(run_dir: Path, request: Request) -> Path:
    """Write ``request`` into the run's request directory atomically; returns its path."""
    directory = confine.walk(run_dir, DIRNAME)
    directory.mkdir(exist_ok=True)
    confine.check_entry(directory, kind="dir")
    target = directory / f"{request.request_id}.json"
    fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(request.model_dump_json())
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def withdraw(path: Path) -> bool:
    """Take back a request the run has not picked up; False when it already has (it is being answered)."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


Taken = tuple[str, Request | None, str]  # (file name, the request or None when unusable, why unusable)


def take(run_dir: Path) -> Iterator[Taken]:
    """Every request file waiting in ``run_dir`` (removed as it is taken), in name order; a file that is not a
    valid request comes back with the reason, never quoted."""
    directory = run_dir / DIRNAME
    try:
        confine.check_entry(directory, kind="dir")
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if not e.name.startswith("."))
    except FileNotFoundError:
        return
    except (OSError, confine.UnsafePath):
        return  # no usable request directory: nothing was asked in a way that can be read
    for name in names:
        path = directory / name
        try:
            raw = confine.read_bytes(path, MAX_REQUEST_BYTES)
        except FileNotFoundError:
            continue
        except (OSError, confine.UnsafePath) as exc:
            _remove(path)
            yield name, None, bounded.clip(str(exc).removeprefix(str(path)).strip(), 120)
            continue
        _remove(path)
        try:
            yield name, Request.model_validate_json(json.dumps(bounded.loads_json(raw))), ""
        except bounded.ParseError as exc:
            yield name, None, str(exc)
        except ValidationError as exc:
            yield name, None, f"not a valid request ({exc.error_count()} problem(s), first at "\
                              f"{'.'.join(str(p) for p in exc.errors()[0]['loc']) or 'top level'})"


def pending(run_dir: Path) -> bool:
    """Whether any request file is waiting (one ``stat`` and, when the directory exists, one listing)."""
    try:
        with os.scandir(run_dir / DIRNAME) as it:
            return any(not e.name.startswith(".") for e in it)
    except OSError:
        return False


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:  # the requester withdrew it as we took it: it is answered anyway
        return
