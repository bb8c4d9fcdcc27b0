"""A training session on one rank of several (torchrun / ``esper train --nproc``).

Rank 0 prepares the session exactly as a single process does (the run directory, its writer lock, the verified
checkpoint, the config checks) and broadcasts what it prepared, or why it could not; the other ranks follow it:
the same config, the same run id and checkpoint, their own events, metrics and summary under ``RUN/rank-K/``
(rank 0 alone writes the run's events, metrics, summary and checkpoints). In a world of one this is
``TrainSession.prepare``, unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from esper.app.session import Resume, TrainSession, resume_dir
from esper.app.views.status import Run, state
from esper.core.checkpoint import LoadedCheckpoint, latest_checkpoint, resolve_checkpoint
from esper.core.config import EsperConfig, from_dict
from esper.core.config.faults import MULTI_RANK
from esper.core.dist import broadcast, current, forward, rank_dir, restart_count
from esper.core.errors import EsperError, ExitCode, UsageError
from esper.core.records.rundir import RunDir
from esper.core.records.telemetry import Emitter
from esper.core.tolaria import FaultEntry, Reporter, train


class RankZeroFailed(EsperError):
    """Rank 0 could not prepare the session: every rank exits with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


class HaltedRun(EsperError):
    """An elastic restart of a group whose run HALTED: a HALT is a decision, not a crash, and is never resumed."""

    exit_code = ExitCode.HALTED


@dataclass
class FollowerSession:
    """A rank > 0: trains in lockstep with rank 0, writes only its own ``RUN/rank-K/`` files."""

    cfg: EsperConfig
    run_dir: RunDir
    resume: LoadedCheckpoint | None = None
    injected: tuple[FaultEntry, ...] = ()

    def run(self, reporter: Reporter | None = None) -> dict[str, Any]:
        rd = self.run_dir
        rd.path.mkdir(parents=True, exist_ok=True)
        emitter = Emitter(rd.events, rd.run_id, self.cfg.telemetry, first_seq=rd.last_event_seq() + 1)
        forward.collect(emitter, current().rank)  # its warnings and CRITICAL events reach the run's own log
        return train(self.cfg, rd, reporter=reporter, emitter=emitter, resume=self.resume, faults=self.injected)

    def close(self) -> None:
        return None


def prepare(own: EsperConfig, **options: Any) -> TrainSession | FollowerSession:
    """``TrainSession.prepare(own, **options)`` on rank 0, followed by every other rank."""
    world = current()
    if not world.active:
        _refuse_multi_rank(own, options.get("faults") or [])
        return _prepare(own, options)
    if world.writer:
        try:
            session = _prepare(own, options)
        except BaseException as exc:
            code = exc.exit_code if isinstance(exc, EsperError) else ExitCode.INTERNAL
            broadcast(("error", f"{type(exc).__name__}: {exc}", int(code)), world)
            raise
        ckpt = str(session.resume.path) if session.resume is not None else None
        broadcast(("ok", str(session.run_dir.path), session.run_dir.run_id, session.cfg.to_dict(), ckpt,
                   [(f.name, f.at, f.level) for f in session.injected]), world)
        return session
    message = broadcast(None, world)
    if message[0] == "error":
        raise RankZeroFailed(f"rank 0 could not start the run: {message[1]}", message[2])
    _, path, run_id, cfg, ckpt, injected = message
    resume = Resume.load(Path(ckpt)).checkpoint if ckpt is not None else None
    return FollowerSession(from_dict(cfg), RunDir(rank_dir(Path(path), world.rank), run_id), resume,
                           tuple(FaultEntry(*f) for f in injected))


def _prepare(own: EsperConfig, options: dict[str, Any]) -> TrainSession:
    """An elastic restart of the group (torchelastic's restart count > 0) runs the same command line again: the
    run it names (``--run-dir``, else the run of ``--resume``) resumes from its ``latest`` by itself, and says so
    (``run.restarted``); a run that HALTED stays HALTED (exit 6)."""
    restarts = restart_count()
    run_dir = _target(options) if restarts else None
    if run_dir is None:
        if restarts:
            raise UsageError("an elastic restart needs --run-dir DIR (or --resume): without one the restarted "
                             "group would start a new run", key="--run-dir")
        return TrainSession.prepare(own, **options)
    _refuse_halted(run_dir, restarts)
    latest = latest_checkpoint(run_dir / "checkpoints")
    if latest is None:  # died before its first checkpoint: the restart trains what the command line says
        return TrainSession.prepare(own, **options)
    session = TrainSession.prepare(own, **{**options, "run_dir": run_dir, "resume": run_dir})
    session.notices.append(("run.restarted", "CRITICAL", {"restart": restarts, "checkpoint": str(latest),
                                                          "world_size": current().size}))
    return session


def _target(options: dict[str, Any]) -> Path | None:
    """The run directory the command line names: ``--run-dir``, else the run ``--resume`` continues."""
    if options.get("run_dir") is not None:
        return Path(options["run_dir"])
    if options.get("resume") is not None:
        return resume_dir(resolve_checkpoint(Path(options["resume"])), None)
    return None


def _refuse_halted(run_dir: Path, restarts: int) -> None:
    """torch's elastic agent restarts a group whatever its exit code (it has no per-code policy), so a HALT
    (exit 6 on every rank) comes back as a restart: when the run's last session ended HALTED (its summary.json is
    that session's), this attempt ends at once with exit 6 and leaves the run as it is (no lock, no event)."""
    if state(Run.load(run_dir), alive=False).status == "HALTED":
        raise HaltedRun(f"{run_dir} HALTED before this restart (attempt {restarts}): a HALT is not restarted; see "
                        "its summary.json and events, then resume it with --resume once the cause is dealt with")


def _refuse_multi_rank(own: EsperConfig, flags: list[str]) -> None:
    """A fault that kills a rank other than the writer has nothing to act on in a world of one: say so up front."""
    names = [f.name for f in own.faults] + [f.partition("@")[0] for f in flags]
    for name in names:
        if name in MULTI_RANK:
            raise UsageError(f"the {name} fault needs 2 ranks or more: esper train --nproc 2 --max-restarts 1 "
                             f"--run-dir DIR --fault {name}@EPOCH[:STEP]", key="--fault")
