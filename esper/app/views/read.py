"""Every read the operator views (``plot``, ``watch``, ``runs``) make of a run directory, in this one module, so
bounds on what is read and confinement to the run directory (S-2, S-4) apply in one place.

Readers never take the writer's lock and never write. JSONL files go through :mod:`esper.core.io.jsonl` (a torn or
garbled line is skipped and reported, later lines kept); :class:`Tail` follows a growing file by offset, keeping
an unfinished last line until its newline arrives. Nothing here raises for what a file holds: a missing,
unreadable or malformed file is a problem string the caller shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esper.core.checkpoint import LATEST, MANIFEST, latest_checkpoint
from esper.core.checkpoint.manifest import MAX_MANIFEST_BYTES, validate
from esper.core.errors import CheckpointError
from esper.core.io import confine, jsonl
from esper.core.io.confine import UnsafePath
from esper.core.records import runlock

CONFIG, EVENTS, METRICS, SUMMARY = "config.toml", "events.jsonl", "metrics.jsonl", "summary.json"
RUN_FILES = (CONFIG, EVENTS, METRICS, SUMMARY)
MAX_SMALL_FILE = 16 << 20  # summary.json, config.toml: far above anything Esper writes
MAX_POLL_READ = 4 << 20  # what one Tail.poll reads at most (its parsed records too); the rest on the next poll


def is_run_dir(path: Path) -> bool:
    """A real (not symlinked) directory holding at least one of the files a run writes."""
    return path.is_dir() and not path.is_symlink() and any((path / f).is_file() for f in RUN_FILES)


def entries(parent: Path) -> list[Path]:
    """The entries of a directory of runs, sorted by name (OSError when it cannot be listed)."""
    return sorted(parent.iterdir())


def writer_alive(run: Path) -> bool:
    """Whether a live process holds the run's writer lock (the probe never gets in a writer's way)."""
    return runlock.writer_alive(run)


def had_writer(run: Path) -> bool:
    """Whether a writer ever locked this directory (the lock file outlives its holder)."""
    return runlock.lock_path(run).is_file()


def _small(path: Path) -> tuple[bytes | None, str | None]:
    if not os.path.lexists(path):
        return None, None
    try:
        # opened without blocking and checked to be a regular file: a FIFO or a device is never waited on
        return confine.read_bytes(path, MAX_SMALL_FILE), None
    except UnsafePath as exc:
        return None, f"{path.name}: {_why(exc, path)} (not read)"
    except OSError as exc:
        return None, f"{path.name}: cannot be read: {exc.strerror or exc}"


def _why(exc: UnsafePath, path: Path) -> str:
    return str(exc).removeprefix(f"{path} ").removeprefix("is ")


def read_summary(run: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """``summary.json`` (None when absent or unusable) and the problems found."""
    data, problem = _small(run / SUMMARY)
    if data is None:
        return None, [problem] if problem else []
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, [f"{SUMMARY}: not valid JSON ({exc}); the run may have died while writing it"]
    if not isinstance(doc, dict):
        return None, [f"{SUMMARY}: not a JSON object"]
    return doc, []


def read_config(run: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """The run's resolved ``config.toml`` as a plain dict (not validated: an older Esper may have written it)."""
    data, problem = _small(run / CONFIG)
    if data is None:
        return None, [problem] if problem else []
    try:
        return tomllib.loads(data.decode("utf-8")), []
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        return None, [f"{CONFIG}: not valid TOML ({exc})"]


def stream_jsonl(run: Path, name: str, feed: Callable[[list[jsonl.Line]], object]) -> list[str]:
    """Hand a JSONL file of the run to ``feed`` one bounded read at a time (memory stays bounded by what the
    consumer keeps, not by the file); returns a problem per skipped line and for a file that cannot be read."""
    tail = Tail(run / name)
    skipped: list[jsonl.Skipped] = []
    while True:
        update = tail.poll()
        feed(update.lines)
        skipped += update.skipped
        if not update.more:
            break
    skipped += tail.finish().skipped
    return [f"{name} {s.where()}: {s.detail}" for s in skipped] + tail.problems


@dataclass
class TailUpdate:
    lines: list[jsonl.Line] = field(default_factory=list)
    skipped: list[jsonl.Skipped] = field(default_factory=list)
    reset: bool = False  # the file was replaced or truncated (a resume rewrites metrics.jsonl): start over
    more: bool = False  # more bytes are waiting than one poll reads
    problems: list[str] = field(default_factory=list)  # the file turned unreadable or odd (each said once)


class Tail:
    """Follows one JSONL file as it grows: each :meth:`poll` returns the whole lines added since the last one.

    An unfinished last line is kept until its newline arrives (a writer mid-line, or a torn write that the
    writer's next append ends); :meth:`finish`, once the writer is gone, reports what is left as the torn tail.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.problems: list[str] = []
        self._ident: tuple[int, int] | None = None
        self._offset = 0
        self._partial = b""
        self._lines = 0  # whole lines consumed: numbers stay file line numbers across polls

    def _problem(self, problem: str) -> TailUpdate:
        if problem in self.problems:
            return TailUpdate()
        self.problems.append(problem)
        return TailUpdate(problems=[problem])

    def poll(self) -> TailUpdate:
        try:
            # without blocking, and only a regular file: a FIFO, a device or a directory is a problem, not a hang
            fh = confine.open_regular(self.path)
        except FileNotFoundError:
            return TailUpdate()
        except UnsafePath as exc:
            return self._problem(f"{self.path.name}: {_why(exc, self.path)} (not read)")
        except OSError as exc:
            return self._problem(f"{self.path.name}: cannot be read: {exc.strerror or exc}")
        with fh:
            st = os.fstat(fh.fileno())
            reset = self._ident is not None and ((st.st_dev, st.st_ino) != self._ident or st.st_size < self._offset)
            if reset:
                self._offset, self._partial, self._lines = 0, b"", 0
            self._ident = (st.st_dev, st.st_ino)
            fh.seek(self._offset)
            data = fh.read(min(st.st_size - self._offset, MAX_POLL_READ)) if st.st_size > self._offset else b""
        self._offset += len(data)
        more = st.st_size > self._offset
        buf = self._partial + data
        cut = buf.rfind(b"\n")
        if cut < 0:
            self._partial = buf
            return TailUpdate(reset=reset, more=more)
        whole, self._partial = buf[: cut + 1], buf[cut + 1 :]
        lines, skipped = jsonl.parse(whole)
        base = self._lines
        self._lines += whole.count(b"\n")
        return TailUpdate([dataclasses.replace(x, number=x.number + base) for x in lines],
                          [dataclasses.replace(s, number=s.number + base) for s in skipped], reset, more)

    def finish(self) -> TailUpdate:
        """The writer is gone: an unfinished last line will never complete; report it as torn."""
        if not self._partial:
            return TailUpdate()
        lines, skipped = jsonl.parse(self._partial)
        base = self._lines
        self._lines += 1
        self._partial = b""
        return TailUpdate([dataclasses.replace(x, number=x.number + base) for x in lines],
                          [dataclasses.replace(s, number=s.number + base) for s in skipped])


@dataclass(frozen=True)
class CheckpointCheck:
    """The cheap check of the last checkpoint: ``latest`` names a checkpoint directory whose manifest is within
    bounds, parses, fits the schema and its own seal, and lists files that exist with the sizes it records.
    The tensor bytes are not hashed (``esper inspect-checkpoint RUN --verify`` does that)."""

    path: str | None
    ok: bool
    detail: str


def check_checkpoint(run: Path) -> CheckpointCheck:
    root = run / "checkpoints"
    if not (root / LATEST).exists():
        return CheckpointCheck(None, False, "no checkpoint yet")
    try:
        ckpt = latest_checkpoint(root)
    except CheckpointError as exc:
        return CheckpointCheck(None, False, str(exc))
    if ckpt is None:  # pragma: no cover - the pointer exists
        return CheckpointCheck(None, False, "no checkpoint yet")
    if ckpt.is_symlink():
        return CheckpointCheck(str(ckpt), False, "is a symbolic link")
    mpath = ckpt / MANIFEST
    try:
        if mpath.is_symlink() or not mpath.is_file():
            return CheckpointCheck(str(ckpt), False, f"{MANIFEST} is missing or not a regular file")
        if mpath.stat().st_size > MAX_MANIFEST_BYTES:
            return CheckpointCheck(str(ckpt), False, f"{MANIFEST} is too large")
        doc = json.loads(mpath.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return CheckpointCheck(str(ckpt), False, f"{MANIFEST} cannot be read: {exc}")
    if not isinstance(doc, dict):
        return CheckpointCheck(str(ckpt), False, f"{MANIFEST} is not a JSON object")
    manifest, problems = validate(doc)
    if manifest is None or problems:
        return CheckpointCheck(str(ckpt), False, "; ".join(problems) or "manifest does not fit the schema")
    for name, entry in manifest.files.items():
        fpath = ckpt / name
        if "/" in name or name.startswith(".") or fpath.is_symlink() or not fpath.is_file():
            return CheckpointCheck(str(ckpt), False, f"{name}: missing or not a plain file in the checkpoint")
        if fpath.stat().st_size != entry.bytes:
            return CheckpointCheck(str(ckpt), False, f"{name}: {fpath.stat().st_size} bytes, manifest says "
                                                     f"{entry.bytes}")
    return CheckpointCheck(str(ckpt), True, "manifest and file sizes ok (not hashed)")
