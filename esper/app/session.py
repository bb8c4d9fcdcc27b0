"""One training session: take the run directory (new or resumed) for this process alone, check everything that
can be checked before anything in it changes, run, summarise.

Order (S-5, S-3, S-1): resolve the run directory; take its writer lock (exit 8 when another process holds it);
refuse a directory a new run would share with an old one; on a resume verify the checkpoint (files and the whole
manifest schema), then check the config it brings (no code reference or path the operator's own config does not
name: exit 4; drift: exit 3); build the run and restore the checkpoint into it in memory (a state that does not
fit: exit 4). Only then is the directory written: config, the events held so far (``seq`` continuing the file's),
the rewritten metrics. The lock is held until the run has ended.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from esper.app.preflight import preflight
from esper.core.checkpoint import LoadedCheckpoint, load_checkpoint, resolve_checkpoint
from esper.core.config import REPORTING_KEYS, EsperConfig, FaultConfig, from_dict, from_toml_text, trust
from esper.core.config.faults import CATALOGUE, unknown_fault
from esper.core.errors import CheckpointError, ConfigError, UsageError
from esper.core.records import loggers
from esper.core.records.rundir import RunDir, disk_fault, is_disk_error, make_dir, new_run_id
from esper.core.records.runlock import LOCK_NAME, RunLock
from esper.core.records.telemetry import Emitter, TelemetryError
from esper.core.tolaria import FaultEntry, Reporter, train

Base = Literal["config", "checkpoint"]


def parse_fault_flag(text: str) -> FaultConfig:
    """``NAME@EPOCH[:STEP]`` -> a fault entry (validated like the config's ``[[faults]]``); one line naming the
    problem, with a suggestion for a mistyped name."""
    name, sep, at = text.partition("@")
    if not sep:
        raise UsageError(f"--fault {text!r}: expected NAME@EPOCH[:STEP], e.g. nan_loss@2:5", key="--fault")
    if name not in CATALOGUE:
        raise UsageError(f"--fault {text!r}: {unknown_fault(name)}", key="--fault")
    try:
        return FaultConfig.model_validate({"name": name, "at": at})
    except ValueError as exc:
        detail = exc.errors()[0]["msg"].removeprefix("Value error, ") if hasattr(exc, "errors") else str(exc)
        raise UsageError(f"--fault {text!r}: {detail}", key="--fault") from None


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for k in sorted(set(old) | set(new)):
        path = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys.extend(changed_keys(a, b, path + "."))
        elif a != b:
            keys.append(path)
    return keys


@dataclass(frozen=True)
class Resume:
    """A verified checkpoint to resume from and the config it was trained with (parsed once)."""

    checkpoint: LoadedCheckpoint
    config: EsperConfig

    @classmethod
    def load(cls, path: Path) -> Resume:
        """Verify every file and the whole manifest (schema included) and parse its config: CheckpointError for
        anything that is not a resumable training checkpoint."""
        loaded = load_checkpoint(path)
        problems = loaded.manifest.training_problems()
        if problems:
            raise CheckpointError(f"{loaded.path}: cannot be resumed: {'; '.join(problems)}")
        assert loaded.manifest.config_toml is not None  # training_problems checked it
        try:
            cfg = from_toml_text(loaded.manifest.config_toml, source=f"{loaded.path}/manifest.json [config_toml]")
        except ConfigError as exc:  # verification checks it too; a checkpoint's config is the checkpoint's problem
            raise CheckpointError(str(exc), key=exc.key) from None
        return cls(loaded, cfg)

    def config_with(self, overrides: Sequence[str]) -> EsperConfig:
        """The checkpoint's own config plus ``--set`` overrides: the base of a plain ``--resume``."""
        return from_dict(self.config.to_dict(), overrides)


def with_faults(cfg: EsperConfig, flags: Sequence[str]) -> EsperConfig:
    if not flags:
        return cfg
    extra = [parse_fault_flag(f).model_dump() for f in flags]
    return from_dict({**cfg.to_dict(), "faults": [*cfg.to_dict()["faults"], *extra]})


def resume_dir(checkpoint: Path, explicit: Path | None) -> Path:
    """The run directory a resume writes: ``--run-dir``, else the run the checkpoint is part of
    (``RUN/checkpoints/NAME``). A checkpoint anywhere else needs ``--run-dir``: Esper never guesses a directory."""
    if explicit is not None:
        return explicit
    if checkpoint.parent.name == "checkpoints":
        return checkpoint.parent.parent
    raise UsageError(f"{checkpoint} is not inside a run directory's checkpoints/: pass --run-dir DIR for the "
                     "resumed run's files", key="--run-dir")


@dataclass
class TrainSession:
    cfg: EsperConfig
    run_dir: RunDir
    lock: RunLock
    resume: LoadedCheckpoint | None = None
    config_changes: list[str] = field(default_factory=list)
    created: bool = False  # this session made the directory (removed again if the run never starts)
    injected: tuple[FaultEntry, ...] = ()
    notices: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)  # (event, level, attrs) at commit

    @classmethod
    def prepare(cls, cfg: EsperConfig, *, run_dir: Path | None, resume: Path | Resume | None = None,
                base: Base = "config", overrides: Sequence[str] = (), faults: Sequence[str] | None = None,
                allow_config_change: Sequence[str] | None = None,
                injected: Sequence[FaultEntry] = ()) -> TrainSession:
        """Take the run directory and check everything that can be checked before training (see the module).

        ``cfg`` is the operator's own config (file + ``--set``). A fresh run trains it. A resume trains it too
        (``base="config"``, the operator gave a config), or the checkpoint's config plus ``overrides``
        (``base="checkpoint"``, a plain ``--resume``); either way ``cfg`` is what the checkpoint's code
        references and paths must match."""
        loggers.require(cfg)
        if resume is None:
            cfg = with_faults(cfg, faults or ())
            preflight(cfg)  # what would stop the run stops it before it has a directory
            return cls._fresh(cfg, run_dir, injected)
        ckpt = resume.checkpoint.path if isinstance(resume, Resume) else resolve_checkpoint(resume)
        path = resume_dir(ckpt, run_dir)
        created = not os.path.lexists(path)
        make_dir(path, "--run-dir")
        lock_new = not os.path.lexists(path / LOCK_NAME)
        lock = _take(path)
        try:
            own = ckpt.parent.parent.resolve() == path.resolve() and ckpt.parent.name == "checkpoints"
            if not own:
                _require_empty(RunDir(path, "?"), "resume into")
            loaded = resume if isinstance(resume, Resume) else Resume.load(ckpt)
            used = with_faults(loaded.config_with(overrides) if base == "checkpoint" else cfg, faults or ())
            trust.check_resume(used, cfg, f"{loaded.checkpoint.path}/manifest.json")
            changes = _drift(loaded, used, allow_config_change or ())
            preflight(used)
            run_id = loaded.checkpoint.manifest.run_id
            assert run_id is not None  # training_problems checked it
            return cls(used, RunDir(path, run_id), lock, loaded.checkpoint, changes, created, tuple(injected))
        except BaseException:
            _give_up(lock, path, created, lock_new)
            raise

    @classmethod
    def _fresh(cls, cfg: EsperConfig, explicit: Path | None, injected: Sequence[FaultEntry]) -> TrainSession:
        run_id = new_run_id(cfg)
        path = explicit if explicit is not None else Path(cfg.run.output_dir) / run_id
        created = not os.path.lexists(path)
        make_dir(path, "--run-dir" if explicit is not None else "run.output_dir")
        rd = RunDir(path, run_id)
        lock_new = not os.path.lexists(path / LOCK_NAME)
        lock = _take(path)
        try:
            _require_empty(rd, "start a new run in")
        except BaseException:
            _give_up(lock, path, created, lock_new)
            raise
        return cls(cfg, rd, lock, created=created, injected=tuple(injected))

    def run(self, reporter: Reporter | None) -> dict[str, Any]:
        """Train (the lock is held throughout and released at the end); returns the summary."""
        rd = self.run_dir
        try:
            emitter = Emitter(rd.events, rd.run_id, self.cfg.telemetry, hold=True,
                              first_seq=rd.last_event_seq() + 1)

            def commit() -> None:
                try:
                    rd.write_config(self.cfg)  # first: a watcher takes the directory for a run once it is there
                    rd.checkpoints.mkdir(exist_ok=True)
                    emitter.release()
                except OSError as exc:
                    if is_disk_error(exc):
                        raise disk_fault(f"cannot write the run directory {rd.path}", exc) from None
                    raise
                except TelemetryError as exc:  # the held first events could not be written: the same disk fault
                    cause = exc.__cause__
                    if isinstance(cause, OSError) and is_disk_error(cause):
                        raise disk_fault(f"cannot write {rd.events}", cause) from None
                    raise
                self.created = False  # the run has started: its directory is its record from now on
                if self.config_changes:
                    emitter.emit("cli", "config.changed_on_resume", "WARNING", keys=self.config_changes)
                for event, level, attributes in self.notices:
                    emitter.emit("cli", event, level, **attributes)

            attached = loggers.attach(self.cfg, rd.path, emitter)
            try:
                return train(self.cfg, rd, reporter=reporter, emitter=emitter, resume=self.resume,
                             faults=self.injected, commit=commit)
            except BaseException:
                emitter.discard()
                raise
            finally:
                for logger in attached:
                    logger.close()
        except BaseException:
            _give_up(self.lock, rd.path, self.created)
            raise
        finally:
            self.lock.release()

    def close(self) -> None:
        """Release the lock without running (a prepared session that is not used)."""
        _give_up(self.lock, self.run_dir.path, self.created)


def _take(path: Path) -> RunLock:
    lock = RunLock(path)
    try:
        lock.acquire()
    except OSError as exc:
        if is_disk_error(exc):
            raise disk_fault(f"cannot take the writer lock {path / LOCK_NAME}", exc) from None
        raise UsageError(f"cannot take the writer lock {path / LOCK_NAME}: {exc.strerror or exc}") from None
    return lock


def _require_empty(rd: RunDir, what: str) -> None:
    held = rd.contents()
    if held:
        shown = ", ".join(held[:5]) + (", ..." if len(held) > 5 else "")
        raise UsageError(f"refusing to {what} {rd.path}: it is not empty (it holds {shown}). Resume a run with "
                         f"--resume {rd.path}, or give an empty or new --run-dir", key="--run-dir")


def _drift(loaded: Resume, used: EsperConfig, allowed: Sequence[str]) -> list[str]:
    if loaded.checkpoint.manifest.config_hash == used.config_hash():
        return []
    changes = changed_keys(loaded.config.to_dict(), used.to_dict())
    free = [*allowed, *REPORTING_KEYS]  # what a run reports (its loggers) may change: it trains the same
    refused = [k for k in changes if not any(k == a or k.startswith(a + ".") for a in free)]
    if refused:
        raise ConfigError(f"resume refused: the config differs from the checkpoint's in {refused}; "
                          f"pass --allow-config-change KEY for each key you mean to change", key=refused[0])
    return changes


def _give_up(lock: RunLock, path: Path, created: bool, lock_new: bool = False) -> None:
    """Release the lock; a directory this session created, and nothing was written to, goes again, and so does a
    lock file this session created in a directory it refused (a refused start writes nothing)."""
    # best effort: on a disk that refuses even this, the empty directory stays and the error that brought us
    # here is the one the operator sees
    with contextlib.suppress(OSError):
        if created and lock.held and os.listdir(path) == [LOCK_NAME]:
            (path / LOCK_NAME).unlink()
            path.rmdir()
        elif lock_new and lock.held:
            (path / LOCK_NAME).unlink()
    lock.release()
