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

from esper.core.checkpoint import LoadedCheckpoint, latest_checkpoint
from esper.core.config import EsperConfig, from_dict
from esper.core.dist import broadcast, current, restart_count
from esper.core.errors import EsperError, ExitCode
from esper.core.rundir import RunDir
from esper.core.session import Resume, TrainSession
from esper.core.telemetry import Emitter
from esper.core.tolaria import FaultEntry, Reporter, train


class RankZeroFailed(EsperError):
    """Rank 0 could not prepare the session: every rank exits with its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = ExitCode(exit_code)


def rank_dir(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` (> 0) writes its own events, metrics and summary."""
    return run_dir / f"rank-{rank}"


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
        return train(self.cfg, rd, reporter=reporter, emitter=emitter, resume=self.resume, faults=self.injected)

    def close(self) -> None:
        return None


def prepare(own: EsperConfig, **options: Any) -> TrainSession | FollowerSession:
    """``TrainSession.prepare(own, **options)`` on rank 0, followed by every other rank."""
    world = current()
    if not world.active:
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
    run it names resumes from its ``latest`` by itself, and says so (``run.restarted``)."""
    restarts = restart_count()
    run_dir = options.get("run_dir")
    latest = latest_checkpoint(Path(run_dir) / "checkpoints") if run_dir is not None and restarts else None
    if latest is None or options.get("resume") is not None:
        return TrainSession.prepare(own, **options)
    session = TrainSession.prepare(own, **{**options, "resume": Path(run_dir)})
    session.notices.append(("run.restarted", "CRITICAL", {"restart": restarts, "checkpoint": str(latest),
                                                          "world_size": current().size}))
    return session
