"""Kill a whole process tree: what a runbook step's timeout must end (issue 12 §8).

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
