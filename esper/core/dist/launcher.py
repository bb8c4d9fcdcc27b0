"""Start N ranks of ``python -m esper ARGS`` on this machine under torch's elastic launcher
(``torch.distributed.run``, what torchrun is): one node, c10d rendezvous on localhost, ``max_restarts`` restarts
of the whole group after a worker fails. Multi-node runs use torchrun itself (README "Scale out")."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args
from torch.distributed.run import run as elastic_run

from esper.core.errors import ExitCode


def run_ranks(nproc: int, max_restarts: int, args: Sequence[str], log_dir: Path | None = None) -> int:
    """Run the group (its workers' stdout and stderr go to files under ``log_dir`` when given, else to this
    process's); returns the group's exit code: rank 0's on failure (when the launcher signalled rank 0 because another rank ended
    first, that rank's: a HALT on rank 1 is the group's HALT), else 0."""
    # the elastic agent makes a torchelastic_* directory in $TMPDIR unless given one: ours, removed at the end
    own = Path(tempfile.mkdtemp(prefix="esper-ranks-")) if log_dir is None else None
    logs = ["--log-dir", str(log_dir), "--redirects", "3"] if log_dir is not None else ["--log-dir", str(own)]
    launcher = parse_args(["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts",
                           str(max_restarts), "--monitor-interval", "0.5", *logs, "-m", "esper", *args])
    try:
        elastic_run(launcher)
    except ChildFailedError as exc:
        codes = {f.local_rank: f.exitcode for f in exc.failures.values()}
        ordered = [codes[r] for r in sorted(codes, key=lambda r: (r != 0, r))]
        return next((c for c in ordered if c > 0), int(ExitCode.INTERNAL))
    except SignalException as exc:
        # SIGTERM or Ctrl-C to the launcher: the agent has passed it to the ranks, which stopped at one step and
        # wrote their stop checkpoint; the group's exit code is the signal's, as a single process's would be
        return 128 + int(exc.sigval)
    finally:
        if own is not None:
            shutil.rmtree(own, ignore_errors=True)
    return int(ExitCode.OK)
