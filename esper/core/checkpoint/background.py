"""Asynchronous checkpoint writes (``checkpoint.async``; anchor: TorchTitan's and
``torch.distributed.checkpoint.async_save``'s staging + background write).

The caller's loop stalls only for :meth:`BackgroundWriter.stage`: a copy of every tensor into CPU buffers that
are allocated once and reused while the shapes and dtypes stay the same. A background thread then writes the
staged copy through ``write_checkpoint``: the same atomic commit, ``latest`` rule and pruning as a synchronous
write, so a process killed during it leaves the previous verified ``latest`` (the temp directory is ignored by
readers and removed later). One write is in flight at a time: staging the next one first waits for it (its
buffers are about to be overwritten).

Outcomes are handed back, never acted on in the thread: :meth:`wait` returns the committed
path or the exception the write raised, on the caller's thread, so a failure takes the same path as a
synchronous write's.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from esper.core.checkpoint.write import write_checkpoint


@dataclass(frozen=True)
class Outcome:
    """What one background write came to: ``path`` when it committed, else ``error`` (what it raised)."""

    name: str
    path: Path | None
    error: BaseException | None


class BackgroundWriter:
    """Stage a state into reusable CPU buffers and write it on a thread; at most one write in flight."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[str, str], torch.Tensor] = {}
        self._thread: threading.Thread | None = None
        self._outcome: Outcome | None = None

    @property
    def pending(self) -> bool:
        """A write was submitted and its outcome not yet collected."""
        return self._thread is not None

    def stage(self, tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
        """Copy every tensor into its preallocated buffer (allocated on first use, or when a shape or dtype
        changed); the result is what the background write reads. Refused while a write is in flight (its
        buffers are the ones about to be overwritten): collect its outcome with :meth:`wait` first."""
        if self._thread is not None:
            raise RuntimeError("a background checkpoint write is in flight: wait() for it before staging")
        staged: dict[str, dict[str, torch.Tensor]] = {}
        used: set[tuple[str, str]] = set()
        with torch.no_grad():
            for stem, group in tensors.items():
                out: dict[str, torch.Tensor] = {}
                for key, t in group.items():
                    slot = (stem, key)
                    buf = self._buffers.get(slot)
                    if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
                        buf = torch.empty(t.shape, dtype=t.dtype, device="cpu")
                        self._buffers[slot] = buf
                    buf.copy_(t.detach())
                    out[key] = buf
                    used.add(slot)
                staged[stem] = out
        for slot in set(self._buffers) - used:  # a tensor the state no longer has: its buffer goes
            del self._buffers[slot]
        return staged

    def submit(self, ckpt_root: Path, name: str, staged: dict[str, dict[str, torch.Tensor]],
               payload: Mapping[str, Any], *, keep_last: int,
               before_commit: Callable[[Path], None] | None = None) -> None:
        """Start writing ``staged`` (from :meth:`stage`) with ``payload`` (deep-copied now: the caller's
        objects may change while the thread runs) as checkpoint ``name``."""
        if self._thread is not None:
            raise RuntimeError("a background checkpoint write is in flight: wait() for it first")
        frozen = copy.deepcopy(dict(payload))

        def work() -> None:
            try:
                path = write_checkpoint(ckpt_root, name, staged, frozen, keep_last=keep_last,
                                        before_commit=before_commit)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread by wait()
                self._outcome = Outcome(name, getattr(exc, "checkpoint", None), exc)
            else:
                self._outcome = Outcome(name, path, None)

        self._outcome = None
        self._thread = threading.Thread(target=work, name=f"esper-checkpoint-{name}", daemon=True)
        self._thread.start()

    def wait(self) -> Outcome | None:
        """Block until the in-flight write ends; its outcome (None when nothing was in flight)."""
        if self._thread is None:
            return None
        self._thread.join()
        self._thread = None
        outcome, self._outcome = self._outcome, None
        assert outcome is not None  # work() always records one
        return outcome

    @property
    def running(self) -> bool:
        """A submitted write is still running (its outcome not ready)."""
        return self._thread is not None and self._thread.is_alive()
