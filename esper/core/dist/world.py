"""Which process of how many this is, and the process group between them (torch.distributed under torchrun).

A process is one rank of a world when torchrun (or ``esper train --nproc``, which drives torch's elastic
launcher) started it: ``WORLD_SIZE``/``RANK``/``LOCAL_RANK`` and the c10d rendezvous come from the environment.
A world of one (plain ``esper train``) has no process group at all and every collective here is a no-op, so a
single-process run is bit-identical to one without this package.

The world is process state, as torch.distributed's own group is: :func:`join` sets it once, :func:`current` reads
it (the loader's sharding, the builder's data-parallel part, the session).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist

from esper.core.config import DistConfig, EsperConfig
from esper.core.errors import ConfigError, EsperError, ExitCode

# endings every rank reaches at the same step by construction (COMPLETED, HALTED, STOPPED): the group waits for
# all its ranks before it is torn down. Any other ending may be this rank's alone (a failure only it met) while
# the others wait in a collective: it leaves at once, which ends their collective with an error (RankLost)
# instead of a wait until dist.timeout_s.
AGREED_EXITS = frozenset({ExitCode.OK, ExitCode.HALTED, ExitCode.SIGINT, ExitCode.SIGTERM})


class RankLost(EsperError):
    """A collective failed: another rank left the group (it failed alone, or was killed) or stopped answering."""


@dataclass(frozen=True)
class World:
    """This process's place: rank ``rank`` of ``size`` (``local_rank`` on its node)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        """A process group exists (more than one rank)."""
        return self.size > 1

    @property
    def writer(self) -> bool:
        """Rank 0 writes the run directory's events, metrics, summary and checkpoints."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.size, "local_rank": self.local_rank, "backend": self.backend}


_current = World()


def current() -> World:
    return _current


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) outside torchrun."""
    def read(name: str, default: int) -> int:
        raw = os.environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"${name}={raw!r} is not an integer (set by torchrun)", key=name) from None
    size = read("WORLD_SIZE", 1)
    rank = read("RANK", 0)
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"$RANK={rank} / $WORLD_SIZE={size}: not a rank of the world", key="RANK")
    return rank, size, read("LOCAL_RANK", 0)


def restart_count() -> int:
    """How many times torch's elastic agent has restarted this group (0 on its first attempt, and outside it)."""
    raw = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return int(raw) if raw.isdigit() else 0


def rank_dir(run_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` (> 0) writes its own events, metrics and summary."""
    return run_dir / f"rank-{rank}"


def run_record(run_dir: Path) -> dict[str, Any] | None:
    """What ``summary.json`` says of the world (None in a world of one): this rank, the elastic attempt, and on
    rank 0 every other rank's own files (``rank-K/``), so a rank that failed alone is found from the summary."""
    w = _current
    if not w.active:
        return None
    ranks: list[dict[str, Any]] = []
    for k in range(1, w.size) if w.writer else ():
        d = rank_dir(run_dir, k)
        try:
            files = sorted(p.name for p in d.iterdir() if p.is_file()) if d.is_dir() else []
        except OSError as exc:  # listed as unreadable: the summary is still written
            files = [f"(unreadable: {exc.strerror or exc})"]
        ranks.append({"rank": k, "dir": d.name, "files": files})
    return {**w.describe(), "restart": restart_count(), "elastic_run_id": os.environ.get("TORCHELASTIC_RUN_ID"),
            "ranks": ranks}


def resolve_backend(cfg: DistConfig, device: str) -> str:
    """``auto``: nccl for a cuda run, gloo on cpu; nccl on a cpu run is a config error (it has no cpu path)."""
    if cfg.backend == "auto":
        return "nccl" if device == "cuda" else "gloo"
    if cfg.backend == "nccl" and device != "cuda":
        raise ConfigError("dist.backend = 'nccl' needs run.device = 'cuda' (use gloo or auto on cpu)",
                          key="dist.backend")
    return cfg.backend


def check_config(cfg: EsperConfig, size: int) -> None:
    """What a world of ``size`` needs of the config: the global batch splits into equal shards."""
    if size > 1 and cfg.data.batch_size % size:
        raise ConfigError(f"data.batch_size = {cfg.data.batch_size} does not divide by the world size {size}: "
                          "every rank takes an equal shard of each global batch", key="data.batch_size")


@contextmanager
def joined(cfg: EsperConfig) -> Iterator[World]:
    """Join the world torchrun started (no-op outside torchrun) for the block; the group is destroyed after it,
    last, once nothing of the run holds it."""
    global _current
    rank, size, local = env_world()
    if size == 1:
        yield _current
        return
    backend = resolve_backend(cfg.dist, cfg.run.device)
    check_config(cfg, size)
    if backend == "nccl":
        torch.cuda.set_device(local)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # the elastic agent's store outlives a restart of the group (torch shares the rendezvous TCP store
        # across rounds) and the default group's keys carry no attempt: a restarted group would read the dead
        # attempt's addresses. One prefix per attempt keeps every attempt's keys apart.
        store = tdist.PrefixStore(f"esper/attempt-{restart_count()}", tdist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size, is_master=False, timeout=timeout))
        tdist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=timeout)
    else:
        tdist.init_process_group(backend, timeout=timeout)
    _current = World(rank, size, local, backend)
    agreed = False
    try:
        yield _current
        agreed = True
    except BaseException as exc:  # typer's Exit and Esper's errors carry their exit code
        agreed = getattr(exc, "exit_code", None) in AGREED_EXITS
        raise
    finally:
        try:
            if agreed:
                tdist.barrier()  # nobody tears the group down under a rank still in a collective
        finally:
            tdist.destroy_process_group()
            _current = World()


def broadcast(obj: Any, world: World | None = None) -> Any:
    """Rank 0's ``obj`` on every rank (pickled by torch; only ever between the ranks of one run)."""
    w = world or _current
    if not w.active:
        return obj
    box = [obj if w.writer else None]
    with collective("a broadcast from rank 0"):
        tdist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, world: World | None = None) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    w = world or _current
    if not w.active:
        return [obj]
    out: list[Any] = [None] * w.size
    with collective("an all-gather"):
        tdist.all_gather_object(out, obj)
    return out


@contextmanager
def collective(what: str) -> Iterator[None]:
    """A collective whose failure says what it means: torch raises a bare RuntimeError (gloo: "Connection closed
    by peer", a timeout) when another rank has gone."""
    try:
        yield
    except RuntimeError as exc:
        raise RankLost(f"{what} across the ranks failed: another rank left the group or stopped answering (its "
                       f"own record is RUN/rank-K/, listed in summary.json under world.ranks): {exc}") from exc
