"""Blueprint load manager (Kasmina arch 9): the one place a blueprint becomes a ready-to-attach module.

A load instantiates the blueprint for a slot shape, warms it up with a forward pass on a ``[2, *shape]`` zero
tensor (checking the output keeps that shape), optionally
``torch.compile``-s it and warms the compiled module up too (compilation is lazy: the warm-up is where it
fails). The warmed template is kept in an LRU cache bounded in bytes; :meth:`BlueprintLoadManager.get` hands out
deep copies, so callers never share parameters with the template or with each other.

Every build runs on the manager's own bounded thread pool (the only pool; Kasmina #16-#18), so ``get`` and
``prefetch`` share de-duplication, the per-request timeout and shutdown cancellation. Nothing here touches
asyncio: ``prefetch`` returns a concurrent future and works with or without a running loop (an async caller
wraps it with ``asyncio.wrap_future``), so no loop is ever created or nested.

A failed build, warm-up or compile is a :class:`BlueprintLoadError` with the reason, counted; there is never a
fallback module (arch 3). Counters are windowed (O-4): the trainer closes one window per epoch and emits it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from esper.core.errors import EsperError
from esper.core.kasmina.kinds import SlotShape

Emit = Callable[..., Any]
Build = Callable[[str, SlotShape], nn.Module]
SOURCE = "kasmina"
_Key = tuple[str, SlotShape]


class BlueprintLoadError(EsperError):
    """A blueprint could not be made ready (build, warm-up, compile, timeout or shutdown); carries the reason."""

    def __init__(self, name: str, shape: SlotShape, reason: str) -> None:
        super().__init__(f"blueprint {name!r} ({shape}) failed to load: {reason}")
        self.blueprint = name
        self.shape = shape
        self.reason = reason


@dataclass(frozen=True)
class LoadInfo:
    """What a completed load produced (the value of a prefetch future)."""

    name: str
    shape: SlotShape
    nbytes: int
    load_ms: float
    compiled: bool


@dataclass
class CacheCounters:
    """Counters of one window (or of the manager's lifetime)."""

    gets: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    builds: int = 0
    compile_failures: int = 0
    load_failures: int = 0
    timeouts: int = 0

    @property
    def hit_rate(self) -> float | None:
        """hits / gets, or None before the first get of the window."""
        return self.hits / self.gets if self.gets else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}


@dataclass(frozen=True)
class LoaderStats:
    """A snapshot: the current window, lifetime totals and the cache's occupancy."""

    window: CacheCounters
    lifetime: CacheCounters
    window_s: float
    cached_bytes: int
    cache_bytes: int
    entries: int
    in_flight: int

    def to_dict(self) -> dict[str, Any]:
        return {"window": self.window.to_dict(), "lifetime": self.lifetime.to_dict(),
                "window_s": self.window_s, "cached_bytes": self.cached_bytes, "cache_bytes": self.cache_bytes,
                "entries": self.entries, "in_flight": self.in_flight}


@dataclass(frozen=True)
class ShutdownReport:
    """What :meth:`BlueprintLoadManager.shutdown` did: queued loads cancelled, running ones left behind."""

    cancelled: int
    finished: int
    abandoned: int
    elapsed_s: float


@dataclass
class _Entry:
    module: nn.Module
    info: LoadInfo


def module_nbytes(module: nn.Module) -> int:
    """Bytes held by the module's parameters and buffers (each tensor counted once)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        total += tensor.numel() * tensor.element_size()
    return total


class BlueprintLoadManager:
    """Turns ``(blueprint, slot shape)`` into a warmed-up module; caches templates in a byte-bounded LRU.

    ``build(name, shape)`` instantiates a blueprint. ``cache_bytes`` bounds the cached templates (0 disables
    caching), ``workers`` bounds concurrent loads, ``timeout_ms`` bounds how long :meth:`get` waits for one,
    not counting the time the load spends in ``torch.compile`` (``compile``), which ``compile_timeout_ms``
    bounds apart: compiling a blueprint takes seconds where building it takes milliseconds.
    ``emit(source, event, level, **attributes)`` gets load failures,
    compile failures, evictions and shutdown reports (source ``kasmina``).
    """

    def __init__(self, build: Build, *, cache_bytes: int, workers: int, timeout_ms: int, compile: bool = False,
                 compile_timeout_ms: int = 600_000, emit: Emit | None = None) -> None:
        if cache_bytes < 0 or workers < 1 or timeout_ms < 1:
            raise ValueError(f"need cache_bytes >= 0, workers >= 1, timeout_ms >= 1; got "
                             f"{cache_bytes}, {workers}, {timeout_ms}")
        self._build = build
        self.cache_bytes = cache_bytes
        self.workers = workers
        self.timeout_ms = timeout_ms
        self.compile = compile
        self.compile_timeout_ms = compile_timeout_ms
        # (start, end) of every compile stage: a load waiting while any compile holds the pool is not charged
        self._compiling: list[list[float | None]] = []
        self._emit = emit
        self._lock = threading.Lock()
        self._cache: OrderedDict[_Key, _Entry] = OrderedDict()
        self._cached_bytes = 0
        self._in_flight: dict[_Key, Future[_Entry]] = {}
        self._window = CacheCounters()
        self._lifetime = CacheCounters()
        self._window_start = time.monotonic()
        self._closed = False
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="esper-blueprint-load")

    # -- public API --------------------------------------------------------------------------------------

    def get(self, name: str, shape: SlotShape) -> nn.Module:
        """A fresh deep copy of the warmed template; loads it (or waits on its prefetch) if not cached.

        Raises BlueprintLoadError when the load fails or takes longer than ``timeout_ms``.
        """
        key = (name, shape)
        with self._lock:
            self._check_open(key)
            self._count("gets")
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                self._count("hits")
            else:
                self._count("misses")
                future = self._submit_locked(key)
        if entry is None:
            entry = self._wait(key, future)
        return copy.deepcopy(entry.module)

    def prefetch(self, name: str, shape: SlotShape) -> Future[LoadInfo]:
        """Start loading in the background (de-duplicated); the future resolves to the load's LoadInfo.

        Safe to call with or without a running asyncio loop: it touches none.
        """
        key = (name, shape)
        outer: Future[LoadInfo] = Future()
        with self._lock:
            self._check_open(key)
            entry = self._cache.get(key)
            if entry is None:
                inner = self._submit_locked(key)
        if entry is not None:
            outer.set_result(entry.info)
            return outer
        outer.set_running_or_notify_cancel()

        def relay(done: Future[_Entry]) -> None:
            if done.cancelled():
                outer.set_exception(BlueprintLoadError(name, shape, "cancelled by shutdown"))
            elif (exc := done.exception()) is not None:
                outer.set_exception(exc)
            else:
                outer.set_result(done.result().info)

        inner.add_done_callback(relay)
        return outer

    def is_ready(self, name: str, shape: SlotShape) -> bool:
        """True when ``get`` would be served from the cache without waiting."""
        with self._lock:
            return (name, shape) in self._cache

    def stats(self) -> LoaderStats:
        """The current window's counters, lifetime totals and cache occupancy (O-4)."""
        with self._lock:
            return LoaderStats(window=copy.copy(self._window), lifetime=copy.copy(self._lifetime),
                               window_s=time.monotonic() - self._window_start, cached_bytes=self._cached_bytes,
                               cache_bytes=self.cache_bytes, entries=len(self._cache),
                               in_flight=len(self._in_flight))

    def reset_stats(self) -> CacheCounters:
        """Start a new window; returns the window that just closed."""
        with self._lock:
            closed, self._window = self._window, CacheCounters()
            self._window_start = time.monotonic()
        return closed

    def report_window(self) -> LoaderStats:
        """Close the current window and emit it (``blueprint_cache.window``) with the cache's occupancy."""
        stats = self.stats()
        self.reset_stats()
        self._send("blueprint_cache.window", "INFO", **stats.to_dict())
        return stats

    def shutdown(self, timeout_s: float = 1.0) -> ShutdownReport:
        """Cancel queued loads, wait at most ``timeout_s`` for running ones, and return.

        A load still running after the wait cannot be interrupted (threads cannot be killed); it is reported
        as abandoned, stops at its next stage boundary, and its result is never cached.
        """
        t0 = time.monotonic()
        with self._lock:
            self._closed = True
            pending = list(self._in_flight.values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        running = [f for f in pending if not f.cancelled()]
        done, not_done = wait_futures(running, timeout=max(0.0, timeout_s))
        report = ShutdownReport(cancelled=sum(f.cancelled() for f in pending), finished=len(done),
                                abandoned=len(not_done), elapsed_s=time.monotonic() - t0)
        self._send("blueprint_loader_shutdown", "WARNING" if report.abandoned else "INFO", **asdict(report))
        return report

    # -- internals ---------------------------------------------------------------------------------------

    def _check_open(self, key: _Key) -> None:
        if self._closed:
            raise BlueprintLoadError(key[0], key[1], "the load manager is shut down")

    def _count(self, counter: str, n: int = 1) -> None:
        # caller holds self._lock
        setattr(self._window, counter, getattr(self._window, counter) + n)
        setattr(self._lifetime, counter, getattr(self._lifetime, counter) + n)

    def _submit_locked(self, key: _Key) -> Future[_Entry]:
        future = self._in_flight.get(key)
        if future is None:
            future = self._pool.submit(self._load, key)
            self._in_flight[key] = future
            # a load cancelled before it ran never reaches _load's cleanup: drop it here
            future.add_done_callback(lambda f, k=key: self._forget_cancelled(k, f))
        return future

    def _forget_cancelled(self, key: _Key, future: Future[_Entry]) -> None:
        if future.cancelled():
            with self._lock:
                if self._in_flight.get(key) is future:
                    del self._in_flight[key]

    def _wait(self, key: _Key, future: Future[_Entry]) -> _Entry:
        """Wait for the load: ``timeout_ms`` of waiting not spent compiling, ``compile_timeout_ms`` of compiling."""
        start = time.monotonic()
        while True:
            if future.done():
                break
            compiling = self._compile_time(start)
            left_load = self.timeout_ms / 1000.0 - (time.monotonic() - start - compiling)
            left_compile = self.compile_timeout_ms / 1000.0 - compiling
            if left_load <= 0 or left_compile <= 0:
                reason = (f"not ready within {self.timeout_ms} ms (seeds.load_timeout_ms)" if left_load <= 0 else
                          f"torch.compile took over {self.compile_timeout_ms} ms (seeds.compile_timeout_ms)")
                with self._lock:
                    self._count("timeouts")
                self._send("blueprint_load_timeout", "WARNING", blueprint=key[0], slot_shape=str(key[1]),
                           reason=reason)
                raise BlueprintLoadError(key[0], key[1], reason)
            try:
                # short slices when loads compile, so a compile (started before or during this wait) is taken
                # off the load budget, and held to its own, as it passes
                return future.result(timeout=min(left_load, left_compile, 0.25) if self.compile else left_load)
            except FutureTimeout:
                continue
            except CancelledError:
                raise BlueprintLoadError(key[0], key[1], "cancelled by shutdown") from None
        try:
            return future.result()
        except CancelledError:
            raise BlueprintLoadError(key[0], key[1], "cancelled by shutdown") from None

    def _compile_time(self, since: float) -> float:
        """Seconds since ``since`` (monotonic) during which some load was compiling (the union of the spans)."""
        now = time.monotonic()
        with self._lock:
            spans = sorted((float(a), float(b) if b is not None else now) for a, b in self._compiling)
        total, reach = 0.0, since
        for a, b in spans:
            a = max(a, reach)
            if b > a:
                total += b - a
                reach = b
        return total

    def _load(self, key: _Key) -> _Entry:
        """Runs on the pool: build, warm up, compile, warm up; cache the template. Never returns a fallback."""
        name, shape = key
        t0 = time.perf_counter()
        try:
            with self._lock:
                self._count("builds")
            module = self._stage(key, "build", lambda: self._build(name, shape))
            if not isinstance(module, nn.Module):
                raise self._fail(key, "load_failures", f"build returned {type(module).__name__}, not a Module")
            self._stage(key, "warm-up", lambda: _warm_up(module, shape))
            if self.compile:
                span: list[float | None] = [time.monotonic(), None]
                with self._lock:
                    horizon = span[0] - (self.timeout_ms + self.compile_timeout_ms) / 1000.0  # no wait reaches back
                    self._compiling = [s for s in self._compiling if s[1] is None or s[1] > horizon] + [span]
                try:
                    compiled = self._stage(key, "compile", lambda: torch.compile(module), "compile_failures")
                    self._stage(key, "compiled warm-up", lambda: _warm_up(compiled, shape), "compile_failures")
                finally:
                    with self._lock:
                        span[1] = time.monotonic()
                module = compiled
            info = LoadInfo(name=name, shape=shape, nbytes=module_nbytes(module),
                            load_ms=(time.perf_counter() - t0) * 1000.0, compiled=self.compile)
            entry = _Entry(module, info)
            self._put(key, entry)
            return entry
        finally:
            with self._lock:
                # at most one load per key is in flight, so the entry is this load's own future
                self._in_flight.pop(key, None)

    def _stage(self, key: _Key, stage: str, fn: Callable[[], Any], counter: str = "load_failures") -> Any:
        if self._closed:  # cooperative cancellation: a shut-down manager starts no further stage
            raise BlueprintLoadError(key[0], key[1], f"shut down before {stage}")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 -- any failure of user/torch code is re-raised typed, counted
            raise self._fail(key, counter, f"{stage} failed: {type(exc).__name__}: {exc}") from exc

    def _fail(self, key: _Key, counter: str, reason: str) -> BlueprintLoadError:
        with self._lock:
            self._count(counter)
        event = "blueprint_compile_failed" if counter == "compile_failures" else "blueprint_load_failed"
        self._send(event, "ERROR", blueprint=key[0], slot_shape=str(key[1]), reason=reason)
        return BlueprintLoadError(key[0], key[1], reason)

    def _put(self, key: _Key, entry: _Entry) -> None:
        evicted: list[tuple[_Key, int]] = []
        with self._lock:
            if self._closed or entry.info.nbytes > self.cache_bytes:
                return  # nothing is cached after shutdown; a template over the whole bound is never cached
            old = self._cache.pop(key, None)
            if old is not None:
                self._cached_bytes -= old.info.nbytes
            self._cache[key] = entry
            self._cached_bytes += entry.info.nbytes
            while self._cached_bytes > self.cache_bytes:
                victim_key, victim = self._cache.popitem(last=False)
                self._cached_bytes -= victim.info.nbytes
                self._count("evictions")
                evicted.append((victim_key, victim.info.nbytes))
        for (vname, vshape), nbytes in evicted:  # outside the lock: emit may call back into us
            self._send("blueprint_cache_evicted", "INFO", blueprint=vname, slot_shape=str(vshape), nbytes=nbytes,
                       reason="capacity", cache_bytes=self.cache_bytes)

    def _send(self, event: str, level: str, **attributes: Any) -> None:
        if self._emit is not None:
            self._emit(SOURCE, event, level, **attributes)


def _warm_up(module: nn.Module, shape: SlotShape) -> None:
    """One training-mode forward on zeros; checks the shape contract and leaves buffers as they were."""
    saved = [b.detach().clone() for b in module.buffers()]
    out = module(shape.zeros(2))
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape.batched(2):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"warm-up output {got}, expected {list(shape.batched(2))}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError("warm-up output is not finite")
    with torch.no_grad():  # e.g. BatchNorm running stats must not learn from the zero batch
        for buf, old in zip(module.buffers(), saved, strict=True):
            buf.copy_(old)
