"""Stop a whole process tree: what a runbook step's timeout, or a signal to the runbook, must end (issues 12, 26).

A step runs in its own session, so one ``killpg`` ends its process group; but a step may itself start
processes in sessions of their own (a nested runbook's steps, a drill's workers), which a group kill misses. So
the tree is found by parent links in ``/proc``, frozen (``SIGSTOP``: a stopped process cannot fork another
one) until no new member appears, then killed. A process that was already orphaned (its parent exited before the
timeout) is no longer in the tree; its own group is still killed when it shares the step's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

_PROC = Path("/proc")
_ROUNDS = 20  # freezing rounds: each one catches children forked while the previous was being stopped


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live process (races with exits are expected and skipped)."""
    out: dict[int, int] = {}
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) > 1 and fields[0] != "Z":
            out[int(entry.name)] = int(fields[1])
    return out


def descendants(*roots: int) -> set[int]:
    """Every live process below ``roots`` (children, their children, ...), not the roots themselves."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found - set(roots)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except (ProcessLookupError, PermissionError):
        return


def kill_tree(pid: int) -> set[int]:
    """SIGKILL ``pid``, its process group and every descendant, wherever their sessions are; returns the pids."""
    tree = {pid}
    for _ in range(_ROUNDS):
        for member in tree:
            _signal(member, signal.SIGSTOP)
        grown = tree | descendants(*tree)
        if grown == tree:
            break
        tree = grown
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group may be gone already
        os.killpg(pid, signal.SIGKILL)
    for member in tree:
        _signal(member, signal.SIGKILL)
    return tree


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived while a runbook ran a step (a BaseException, like KeyboardInterrupt: nothing on
    the way may swallow it); the step's tree is stopped and the work directory removed before the exit."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into :class:`Interrupted` in the main thread while the block runs."""

    stopping = False

    def raise_it(signum: int, frame: object) -> None:
        nonlocal stopping
        if stopping:  # a second signal while the step is being stopped: the stop goes on to its end
            return
        stopping = True
        raise Interrupted(signum)

    before = {s: signal.signal(s, raise_it) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def stop_tree(proc: subprocess.Popen[str], grace_s: float) -> None:
    """Stop a step started in its own session: SIGTERM to its group first (an `esper train` writes its stop
    checkpoint, a nested runbook stops its own step and removes its work directory), then, after ``grace_s``,
    SIGKILL to the group and every descendant; the process is reaped either way."""
    before = descendants(proc.pid)  # once it exits, members in other sessions no longer lead back to it
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    kill_tree(proc.pid)  # whatever is left of its group and its tree
    for member in before:  # and what it left behind in sessions of their own
        _signal(member, signal.SIGKILL)
    proc.wait()


@dataclass(frozen=True)
class Completed:
    """What one command did: exit code (None on timeout), streams, wall time."""

    exit_code: int | None
    stdout: str
    stderr: str
    duration_s: float


Executor = Callable[[list[str], Path, float], Completed]


STOP_GRACE_S = 20.0  # how long a stopped step may take to stop itself (a stop checkpoint, a nested cleanup)
DEPTH_ENV = "ESPER_RUNBOOK_DEPTH"  # how deep this runbook is nested: a nested one gives its own step less grace


def stop_grace_s() -> float:
    """The grace of this runbook's steps: halved at each level of nesting, so a nested runbook has stopped its
    own step and removed its work directory before the runbook around it gives up on it."""
    depth = os.environ.get(DEPTH_ENV, "0")
    return STOP_GRACE_S / 2 ** min(int(depth) if depth.isdigit() else 0, 8)


def run_command(argv: list[str], cwd: Path, timeout_s: float) -> Completed:
    """Run ``argv`` in its own session. On timeout, and on a signal to the runbook (:class:`Interrupted`,
    re-raised), stop its whole process tree: SIGTERM first, so a nested runbook removes its own work directory
    and a training step writes its stop checkpoint, then SIGKILL to whatever is left (drills fork workers, a
    nested runbook's steps run in sessions of their own)."""
    start = time.monotonic()
    depth = os.environ.get(DEPTH_ENV, "0")
    env = {**os.environ, DEPTH_ENV: str(int(depth) + 1 if depth.isdigit() else 1)}
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env=env)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        stop_tree(proc, stop_grace_s())
        out, err = proc.communicate()
        return Completed(None, out, err, time.monotonic() - start)
    except BaseException:
        stop_tree(proc, stop_grace_s())  # nothing of the step outlives the runbook
        proc.communicate()
        raise
    return Completed(proc.returncode, out, err, time.monotonic() - start)
