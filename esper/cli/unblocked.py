"""Terminal output that never blocks training: what `esper train` prints goes through a queue to a thread that
writes it to its own copy of the file descriptor.

A stdout nobody reads (a full pipe) would otherwise block the step that prints its epoch line, and with it the
signal handling that stops the run; a reader that went away (``esper train | head -1``) would raise
BrokenPipeError inside the loop. Here the loop only enqueues: a full queue drops the line (counted), a broken pipe
ends the writing (the run goes on, its outcome is in its run directory and its exit code stays the run's). The
thread writes with ``os.write`` on a duplicate descriptor, so it shares no lock with ``sys.stdout`` and a thread
blocked forever on a pipe never stops the interpreter from exiting.
"""

from __future__ import annotations

import contextlib
import io
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

from rich.console import Console

LINES = 10_000  # queued writes before new ones are dropped
CLOSE_WAIT_S = 5.0  # how long the end of a command waits for the reader to take what is queued


class Unblocked(io.TextIOBase):
    """A text stream for Rich whose ``write`` never blocks (see the module docstring)."""

    def __init__(self, fd: int, encoding: str = "utf-8") -> None:
        super().__init__()
        self._encoding = encoding
        self._fd = os.dup(fd)
        self._tty = os.isatty(fd)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=LINES)
        self.dropped = 0
        self.broken = False
        self._thread = threading.Thread(target=self._drain, name="esper-output", daemon=True)
        self._thread.start()

    def write(self, s: str) -> int:
        if s and not self.broken:
            try:
                self._queue.put_nowait(s.encode(self._encoding, "replace"))  # an ASCII locale gets "?"
            except queue.Full:
                self.dropped += 1
        return len(s)

    def flush(self) -> None:
        return None  # the thread writes as soon as it can; nothing to wait for

    @property
    def encoding(self) -> str:  # type: ignore[override]  # Rich draws ASCII boxes for an ASCII terminal
        return self._encoding

    def isatty(self) -> bool:
        return self._tty

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def _drain(self) -> None:
        while (data := self._queue.get()) is not None:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError:  # BrokenPipeError, EBADF, EIO: the reader is gone; the run is not affected
                self.broken = True
                return
            finally:
                self._queue.task_done()

    def settle(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Wait (at most ``wait_s``) until what was queued so far is written: two streams each have their own
        thread, so the live view's last frame on stderr must be out before the outcome goes to stdout (a log
        that takes both would otherwise get them interleaved)."""
        deadline = time.monotonic() + wait_s
        done = self._queue.all_tasks_done
        with done:
            while self._queue.unfinished_tasks and not self.broken and (left := deadline - time.monotonic()) > 0:
                done.wait(min(left, 0.05))  # a reader gone mid-write sets `broken` without a notify

    def finish(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Let the thread write what is queued, waiting at most ``wait_s`` for a reader that is not reading."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=wait_s)
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            os.close(self._fd)


def _fd_of(stream: TextIO | None) -> int | None:
    try:
        return stream.fileno() if stream is not None else None
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer): print to it directly
        return None


def settle(console: Console) -> None:
    """Everything ``console`` was given so far is written (or its reader is gone, or 5 s passed)."""
    if isinstance(console.file, Unblocked):
        console.file.settle()


@contextlib.contextmanager
def consoles() -> Iterator[tuple[Console, Console]]:
    """Rich consoles on stdout and stderr that never block the caller (plain ones where a stream is no file)."""
    made: list[Unblocked] = []

    def console(stream: TextIO | None, *, err: bool) -> Console:
        fd = _fd_of(stream)
        if fd is None:
            return Console(stderr=err, soft_wrap=True)
        made.append(Unblocked(fd, getattr(stream, "encoding", None) or "utf-8"))
        return Console(file=made[-1], soft_wrap=True)

    try:
        yield console(sys.stdout, err=False), console(sys.stderr, err=True)
    finally:
        for stream in made:
            stream.finish()
