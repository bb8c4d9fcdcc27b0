"""The run directory of SPEC §8: config.toml, events.jsonl, metrics.jsonl, checkpoints/, summary.json, run.lock.

Writes here are atomic (a uniquely named temp file, fsync, rename) and never go through a symbolic link. A disk
that refuses a write (full, read-only, failing) is a :class:`DiskFault` naming the file (S-6); a path the
operator cannot use for other reasons (too long, not a directory) is theirs to fix and says so.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.core.config import EsperConfig
from esper.core.errors import DiskFault, UsageError
from esper.core.io import confine, jsonl
from esper.core.records.runlock import LOCK_NAME

# The errors that mean "this disk will not take the write", as opposed to a path that is wrong.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EIO, errno.EDQUOT, errno.EFBIG, errno.ENOMEM})


def new_run_id(cfg: EsperConfig) -> str:
    if cfg.run.run_id:
        return cfg.run.run_id
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def is_disk_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


def disk_fault(what: str, exc: OSError) -> DiskFault:
    return DiskFault(f"{what}: {exc.strerror or exc} (the disk refused the write; the last verified checkpoint "
                     "is untouched)")


@dataclass(frozen=True)
class RunDir:
    path: Path
    run_id: str

    @classmethod
    def create(cls, cfg: EsperConfig, explicit: Path | None) -> RunDir:
        """Make (or reuse) the directory a run writes to: ``explicit`` (``--run-dir``) or
        ``run.output_dir/<run id>``. Whether it may be written (empty, not in use) is the session's to check."""
        run_id = new_run_id(cfg)
        path = explicit if explicit is not None else Path(cfg.run.output_dir) / run_id
        make_dir(path, "--run-dir" if explicit is not None else "run.output_dir")
        return cls(path, run_id)

    @property
    def events(self) -> Path:
        return self.path / "events.jsonl"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def summary(self) -> Path:
        return self.path / "summary.json"

    @property
    def config(self) -> Path:
        return self.path / "config.toml"

    @property
    def field_reports(self) -> Path:
        return self.path / "field_reports.jsonl"

    def contents(self) -> list[str]:
        """What the directory holds besides the writer lock (a run dir a new run may use holds nothing)."""
        with os.scandir(self.path) as it:
            return sorted(e.name for e in it if e.name != LOCK_NAME)

    def write_config(self, cfg: EsperConfig) -> None:
        write_atomic(self.config, cfg.to_toml())

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.summary, json.dumps(summary, indent=2) + "\n")

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One epoch's row. Not fsynced: a resume rewrites the file from the checkpoint's history anyway."""
        jsonl.append(self.metrics, [json.dumps(row)], durable=False)

    def rewrite_metrics(self, rows: list[dict[str, Any]]) -> int:
        """Replace metrics.jsonl with ``rows`` (a resume: the checkpoint's history); returns the rows dropped."""
        old = 0
        if self.metrics.exists():
            old = sum(1 for item in jsonl.iter_file(self.metrics) if isinstance(item, jsonl.Line))
        write_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in rows))
        return max(0, old - len(rows))

    def last_event_seq(self) -> int:
        """The highest ``seq`` in events.jsonl (0 when there is none): a resumed run's events continue after it."""
        if not self.events.exists():
            return 0
        last = 0
        for item in jsonl.iter_file(self.events):
            if isinstance(item, jsonl.Line):
                seq = item.record.get("seq")
                if type(seq) is int and last < seq < 2**62:
                    last = seq
        return last


def make_dir(path: Path, key: str) -> None:
    """``mkdir -p`` for a run directory: a symbolic link or a non-directory is refused (exit 2), a disk that
    refuses is a DiskFault (exit 6), any other OS refusal names the option or key to change (exit 2)."""
    if confine.is_link(path):
        raise UsageError(f"{key} {path} is a symbolic link; Esper writes a run directory only where its real path "
                         "is given", key=key)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{key} {path} exists and is not a directory", key=key) from None
    except OSError as exc:
        if is_disk_error(exc):
            raise disk_fault(f"cannot create run directory {path}", exc) from None
        raise UsageError(f"{key} {path}: cannot create it: {exc.strerror or exc}", key=key) from None


TEMP_SUFFIX = ".tmp"


def is_atomic_temp(name: str) -> bool:
    """Whether ``name`` is one of :func:`write_atomic`'s temp files (``.<target>.<random>.tmp``): a reader
    polling a run directory that is being set up sees them for an instant before the rename."""
    return name.startswith(".") and name.endswith(TEMP_SUFFIX) and name.count(".") >= 3


def write_atomic(path: Path, text: str) -> None:
    """Write via a uniquely named temp file + fsync + rename so readers never see a torn file and two writers
    never share a temp name; the target is replaced, never followed if it is a symbolic link."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp's 0600 would hide the run's files from the people who read them
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError as cleanup:  # a read-only or failing disk: the write's own error is the one to report
            exc.add_note(f"also could not remove {tmp}: {cleanup.strerror or cleanup}")
        raise
