"""``esper train --nproc N [--max-restarts K]``: the same command under torch's elastic launcher
(``torch.distributed.run``, what torchrun is), one node, c10d rendezvous on localhost. Multi-node runs use
torchrun itself (README "Scale out")."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from esper.core.dist.launcher import run_ranks
from esper.core.errors import UsageError

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
    if max_restarts and not any(a in ("--run-dir", "--resume") or a.startswith(("--run-dir=", "--resume="))
                                for a in args):
        # a restarted group runs the same command line again: without a run directory it would start a new run
        raise UsageError("--max-restarts needs --run-dir DIR (a restarted group resumes that run from its latest)",
                         key="--max-restarts")
    return run_ranks(nproc, max_restarts, args)
