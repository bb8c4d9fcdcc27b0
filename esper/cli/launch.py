"""``esper train --nproc N [--max-restarts K]``: the same command under torch's elastic launcher
(``torch.distributed.run``, what torchrun is), one node, c10d rendezvous on localhost. Multi-node runs use
torchrun itself (README "Scale out")."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as elastic_run

from esper.core.errors import ExitCode, UsageError

OWN = ("--nproc", "--max-restarts")


def worker_argv(argv: Sequence[str]) -> list[str]:
    """The command line each worker runs: this one without the launcher's own options."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in OWN:
            skip = True
            continue
        if any(arg.startswith(f"{o}=") for o in OWN):
            continue
        out.append(arg)
    return out


def launch(nproc: int, max_restarts: int, argv: Sequence[str] | None = None) -> int:
    """Start ``nproc`` ranks of ``python -m esper <argv>``; returns the exit code (rank 0's on failure, else that
    of the first rank that exited by itself)."""
    if nproc < 1:
        raise UsageError(f"--nproc {nproc}: at least 1", key="--nproc")
    if max_restarts < 0:
        raise UsageError(f"--max-restarts {max_restarts}: 0 or more", key="--max-restarts")
    args = worker_argv(sys.argv[1:] if argv is None else argv)
    launcher = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts",
                           str(max_restarts), "--monitor-interval", "0.5", "-m", "esper", *args])
    try:
        elastic_run(launcher)
    except ChildFailedError as exc:
        codes = {f.local_rank: f.exitcode for f in exc.failures.values()}
        # rank 0's own exit code; when the launcher signalled it (a negative code) because another rank ended
        # first, that rank's code is the run's (a HALT on rank 1 is the group's HALT)
        ordered = [codes[r] for r in sorted(codes, key=lambda r: (r != 0, r))]
        return next((c for c in ordered if c > 0), int(ExitCode.INTERNAL))
    return int(ExitCode.OK)
