"""Blueprint load manager (Kasmina arch 9, #12-#18) and parameter ownership (#19, #20)."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import torch
from conftest import EventRecorder, wait_until
from torch import nn

from esper.core.kasmina.kinds import SlotShape
from esper.core.kasmina.loader import BlueprintLoadError, BlueprintLoadManager, LoadInfo, module_nbytes
from esper.core.kasmina.ownership import OwnershipIssue, ParameterOwnership


def feat(width: int) -> SlotShape:
    """A features slot of ``width`` (the loader keys templates by blueprint and slot shape)."""
    return SlotShape("features", (width,))


class Builder:
    """Counts builds; optional delay, a gate to hold builds, and names that fail."""

    def __init__(self, fail: set[str] | None = None) -> None:
        self.fail = fail or set()
        self.gate: threading.Event | None = None
        self.calls: list[tuple[str, int]] = []
        self._lock = threading.Lock()

    def __call__(self, name: str, shape: SlotShape) -> nn.Module:
        width = shape.channels
        with self._lock:
            self.calls.append((name, width))
        if self.gate is not None:
            self.gate.wait(10)
        if name in self.fail:
            raise RuntimeError(f"cannot build {name}")
        return nn.Linear(width, width)


def linear_bytes(width: int) -> int:
    return (width * width + width) * 4


def manager(builder: Builder, **kw: Any) -> BlueprintLoadManager:
    opts: dict[str, Any] = {"cache_bytes": 1 << 20, "workers": 2, "timeout_ms": 5000, "compile": False}
    opts.update(kw)
    return BlueprintLoadManager(builder, **opts)


def wait_threads(baseline: set[threading.Thread], timeout_s: float = 5.0) -> None:
    """No thread started since ``baseline`` is left (threads of earlier tests may finish meanwhile)."""
    wait_until(lambda: not set(threading.enumerate()) - baseline, "the manager's threads to end", timeout_s)


# -- concurrency stress -------------------------------------------------------------------------------------


def test_concurrent_get_prefetch_evict_keep_invariants() -> None:
    rec = EventRecorder()
    builder = Builder()
    bound = 6000  # fits a few of the 8 templates (80..4224 bytes each): evictions must happen
    mgr = manager(builder, cache_bytes=bound, workers=3, emit=rec)
    keys = [(name, feat(w)) for name in ("a", "b") for w in (4, 8, 16, 32)]
    n_threads, n_ops = 6, 150
    gets = [0] * n_threads
    errors: list[BaseException] = []
    violations: list[str] = []
    stop = threading.Event()
    start = threading.Barrier(n_threads + 1)

    def worker(i: int) -> None:
        rng = random.Random(i)
        start.wait()
        try:
            for _ in range(n_ops):
                name, shape = rng.choice(keys)
                width = shape.channels
                if rng.random() < 0.25:
                    mgr.prefetch(name, shape)
                    continue
                module = mgr.get(name, shape)
                gets[i] += 1
                assert isinstance(module, nn.Linear) and module.weight.shape == (width, width)
                assert module(torch.zeros(1, width)).shape == (1, width)
        except BaseException as exc:  # noqa: BLE001 -- collected and asserted on in the main thread
            errors.append(exc)

    def monitor() -> None:
        while not stop.is_set():
            s = mgr.stats()
            if s.cached_bytes > bound:
                violations.append(f"cached {s.cached_bytes} > {bound}")
            if s.window.hits + s.window.misses != s.window.gets:
                violations.append(f"window {s.window}")
            if s.lifetime.hits + s.lifetime.misses != s.lifetime.gets:
                violations.append(f"lifetime {s.lifetime}")
            if rng_reset.random() < 0.2:
                mgr.reset_stats()
            stop.wait(0.001)  # pace the checks; returns at once when the workers are done

    rng_reset = random.Random(99)
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n_threads)]
    mon = threading.Thread(target=monitor)
    for t in threads:
        t.start()
    mon.start()
    start.wait()
    for t in threads:
        t.join(60)
    stop.set()
    mon.join(10)
    assert not errors, errors[:3]
    assert not violations, violations[:3]

    for fut in [mgr.prefetch(*k) for k in keys]:  # drain loads still in flight from prefetches
        fut.result(10)
    s = mgr.stats()
    assert s.lifetime.gets == sum(gets) and s.lifetime.hits + s.lifetime.misses == sum(gets)
    assert s.lifetime.evictions > 0 and len(rec.named("blueprint_cache_evicted")) == s.lifetime.evictions
    assert s.lifetime.builds == len(builder.calls)
    # the cache's byte count is exactly the sum of the templates it holds: nothing lost or double counted
    held = [k for k in keys if mgr.is_ready(*k)]
    assert s.entries == len(held) and s.cached_bytes == sum(linear_bytes(k.channels) for _, k in held) <= bound
    assert s.in_flight == 0
    mgr.shutdown(2)


# -- failures are errors, never fallbacks ------------------------------------------------------------------


def test_build_failure_is_an_error_with_reason_and_counted() -> None:
    rec = EventRecorder()
    builder = Builder(fail={"broken"})
    mgr = manager(builder, emit=rec)
    with pytest.raises(BlueprintLoadError, match="cannot build broken") as info:
        mgr.get("broken", feat(8))
    assert info.value.blueprint == "broken" and "build failed" in info.value.reason
    assert mgr.stats().window.load_failures == 1
    assert rec.named("blueprint_load_failed")[0]["blueprint"] == "broken"
    assert rec.events[0].source == "kasmina"
    # a later get tries again (and fails again): nothing was cached in its place
    with pytest.raises(BlueprintLoadError):
        mgr.get("broken", feat(8))
    assert not mgr.is_ready("broken", feat(8)) and len(builder.calls) == 2
    assert mgr.stats().lifetime.load_failures == 2
    fut = mgr.prefetch("broken", feat(8))
    with pytest.raises(BlueprintLoadError):
        fut.result(5)
    mgr.shutdown(1)


def test_failed_load_is_retried_for_real_not_served_a_fallback() -> None:
    attempts: list[int] = []

    def flaky(name: str, shape: SlotShape) -> nn.Module:
        width = shape.channels
        attempts.append(width)
        if len(attempts) == 1:
            raise OSError("transient")
        return nn.Sequential(nn.Linear(width, width), nn.Tanh())

    mgr = BlueprintLoadManager(flaky, cache_bytes=1 << 20, workers=1, timeout_ms=5000)
    with pytest.raises(BlueprintLoadError, match="transient"):
        mgr.get("x", feat(4))
    module = mgr.get("x", feat(4))
    assert isinstance(module, nn.Sequential) and isinstance(module[1], nn.Tanh)
    assert attempts == [4, 4]
    mgr.shutdown(1)


class _NaN(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * float("nan")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda name, s: nn.Linear(s.channels, s.channels + 1), r"warm-up output \[2, 5\], expected \[2, 4\]"),
        (lambda name, s: "not a module", "not a Module"),
        (lambda name, s: nn.Sequential(nn.Linear(s.channels, s.channels), _NaN()), "not finite"),
    ],
)
def test_warm_up_rejects_broken_modules(build: Any, match: str) -> None:
    mgr = BlueprintLoadManager(build, cache_bytes=1 << 20, workers=1, timeout_ms=5000)
    with pytest.raises(BlueprintLoadError, match=match):
        mgr.get("bad", feat(4))
    assert mgr.stats().window.load_failures == 1 and mgr.stats().window.compile_failures == 0
    mgr.shutdown(1)


def test_compile_failure_is_counted_and_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("inductor unavailable")

    monkeypatch.setattr(torch, "compile", refuse)
    rec = EventRecorder()
    mgr = manager(Builder(), compile=True, emit=rec)
    with pytest.raises(BlueprintLoadError, match="compile failed: RuntimeError: inductor unavailable"):
        mgr.get("a", feat(4))
    s = mgr.stats()
    assert s.window.compile_failures == 1 and s.window.load_failures == 0 and not mgr.is_ready("a", feat(4))
    assert rec.named("blueprint_compile_failed")[0]["reason"].startswith("compile failed")
    mgr.shutdown(1)


def test_compiled_module_is_warmed_and_a_lazy_compile_failure_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    class Compiled(nn.Module):
        def __init__(self, inner: nn.Module, explode: bool) -> None:
            super().__init__()
            self.inner = inner
            self.explode = explode
            self.calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.explode:
                raise RuntimeError("backend failed while tracing")
            return self.inner(x)

    explode = {"flag": False}
    monkeypatch.setattr(torch, "compile", lambda m: Compiled(m, explode["flag"]))
    mgr = manager(Builder(), compile=True)
    module = mgr.get("a", feat(4))
    assert isinstance(module, Compiled) and module.calls == 1  # the template's warm-up ran through it
    assert mgr.prefetch("a", feat(4)).result(5).compiled is True

    explode["flag"] = True
    with pytest.raises(BlueprintLoadError, match="compiled warm-up failed"):
        mgr.get("b", feat(4))
    assert mgr.stats().lifetime.compile_failures == 1 and mgr.stats().lifetime.load_failures == 0
    mgr.shutdown(1)


def test_warm_up_leaves_buffers_untouched() -> None:
    def with_bn(name: str, shape: SlotShape) -> nn.Module:
        w = shape.channels
        lin = nn.Linear(w, w)
        nn.init.constant_(lin.bias, 3.0)
        return nn.Sequential(lin, nn.BatchNorm1d(w))

    mgr = BlueprintLoadManager(with_bn, cache_bytes=1 << 20, workers=1, timeout_ms=5000)
    module = mgr.get("bn", feat(4))
    bn = module[1]
    assert isinstance(bn, nn.BatchNorm1d)
    assert torch.equal(bn.running_mean, torch.zeros(4)) and int(bn.num_batches_tracked) == 0
    mgr.shutdown(1)


# -- prefetch, de-duplication, timeouts ---------------------------------------------------------------------


def test_prefetch_then_get_does_not_rebuild_and_copies_are_independent() -> None:
    builder = Builder()
    mgr = manager(builder)
    info = mgr.prefetch("a", feat(8)).result(5)
    assert info == LoadInfo("a", feat(8), linear_bytes(8), info.load_ms, False)
    assert mgr.is_ready("a", feat(8))
    first, second = mgr.get("a", feat(8)), mgr.get("a", feat(8))
    assert builder.calls == [("a", 8)]
    s = mgr.stats().window
    assert (s.gets, s.hits, s.misses, s.builds) == (2, 2, 0, 1)
    assert first is not second and first.weight.data_ptr() != second.weight.data_ptr()
    with torch.no_grad():
        first.weight.fill_(7.0)
    assert not torch.equal(mgr.get("a", feat(8)).weight, first.weight)
    mgr.shutdown(1)


def test_in_flight_requests_are_deduplicated() -> None:
    builder = Builder()
    builder.gate = threading.Event()
    mgr = manager(builder, workers=4)
    futures = [mgr.prefetch("a", feat(4)) for _ in range(5)]
    got: list[nn.Module] = []
    getter = threading.Thread(target=lambda: got.append(mgr.get("a", feat(4))))
    getter.start()
    wait_until(lambda: mgr.stats().window.gets == 1, "the get to join the load in flight")
    builder.gate.set()
    getter.join(5)
    assert [f.result(5).name for f in futures] == ["a"] * 5
    assert builder.calls == [("a", 4)] and len(got) == 1
    assert mgr.stats().window.misses == 1
    mgr.shutdown(1)


def test_get_gives_up_after_the_timeout_and_the_load_still_lands() -> None:
    builder = Builder()
    builder.gate = threading.Event()
    rec = EventRecorder()
    mgr = manager(builder, timeout_ms=100, emit=rec)
    with pytest.raises(BlueprintLoadError, match="not ready within 100 ms"):
        mgr.get("slow", feat(4))
    assert mgr.stats().window.timeouts == 1 and rec.named("blueprint_load_timeout")
    builder.gate.set()
    assert mgr.prefetch("slow", feat(4)).result(5).name == "slow"
    assert builder.calls == [("slow", 4)] and mgr.get("slow", feat(4)).weight.shape == (4, 4)
    mgr.shutdown(1)


def test_prefetch_without_a_running_loop() -> None:
    builder = Builder()
    mgr = manager(builder)
    fut = mgr.prefetch("a", feat(4))
    assert isinstance(fut, Future)
    assert fut.result(5).nbytes == linear_bytes(4)
    with pytest.raises(RuntimeError):
        asyncio.get_running_loop()  # nothing was started behind our back
    mgr.shutdown(1)


def test_prefetch_inside_a_running_loop_never_nests_loops() -> None:
    builder = Builder()
    builder.gate = threading.Event()  # the loads finish only once the loop has ticked while they were pending
    mgr = manager(builder)

    async def main() -> tuple[LoadInfo, LoadInfo, int]:
        loop = asyncio.get_running_loop()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                if ticks == 3:
                    builder.gate.set()  # type: ignore[union-attr]
                await asyncio.sleep(0)

        tick_task = asyncio.create_task(ticker())
        sync_future = mgr.prefetch("b", feat(8))  # the sync API is usable from inside a loop too
        info = await asyncio.wrap_future(mgr.prefetch("a", feat(4)))  # the loop keeps running while the load happens
        tick_task.cancel()
        assert asyncio.get_running_loop() is loop
        return info, await asyncio.wrap_future(sync_future), ticks

    info_a, info_b, ticks = asyncio.run(main())
    assert (info_a.name, info_b.name) == ("a", "b") and ticks >= 3
    assert sorted(builder.calls) == [("a", 4), ("b", 8)]
    mgr.shutdown(1)


# -- shutdown ---------------------------------------------------------------------------------------------


def test_shutdown_under_load_is_prompt_and_cancels_pending() -> None:
    baseline = set(threading.enumerate())
    rec = EventRecorder()
    builder = Builder()
    builder.gate = threading.Event()
    mgr = manager(builder, workers=2, emit=rec)
    futures = [mgr.prefetch("a", feat(w)) for w in range(4, 14)]
    wait_until(lambda: len(builder.calls) == 2, "both workers busy with a load")
    report = mgr.shutdown(0.2)  # the two running loads are held: shutdown waits its bound for them, no longer
    builder.gate.set()
    assert report.cancelled == 8 and (report.finished, report.abandoned) == (0, 2)
    assert len(builder.calls) <= 3
    cancelled = [f for f in futures if isinstance(f.exception(5), BlueprintLoadError)]
    assert len(cancelled) >= 7
    assert "cancelled by shutdown" in str(cancelled[-1].exception())
    assert rec.named("blueprint_loader_shutdown")[0]["cancelled"] == report.cancelled
    with pytest.raises(BlueprintLoadError, match="shut down"):
        mgr.get("a", feat(4))
    with pytest.raises(BlueprintLoadError, match="shut down"):
        mgr.prefetch("a", feat(4))
    assert mgr.stats().entries == 0  # nothing lands in the cache after shutdown
    wait_threads(baseline)


def test_shutdown_abandons_a_stuck_load_within_its_bound() -> None:
    baseline = set(threading.enumerate())
    builder = Builder()
    builder.gate = threading.Event()
    mgr = manager(builder, workers=1)
    fut = mgr.prefetch("stuck", feat(4))
    wait_until(lambda: builder.calls == [("stuck", 4)], "the load to start")
    report = mgr.shutdown(0.2)
    assert (report.abandoned, report.cancelled) == (1, 0)  # the stuck build was not waited for
    builder.gate.set()  # the build returns; the load stops at its next stage and is not cached
    with pytest.raises(BlueprintLoadError, match="shut down before warm-up"):
        fut.result(5)
    wait_threads(baseline)


# -- cache bound, eviction and windowed stats -----------------------------------------------------------


def test_lru_eviction_order_bytes_and_events() -> None:
    rec = EventRecorder()
    builder = Builder()
    mgr = manager(builder, cache_bytes=linear_bytes(8) * 2, emit=rec)
    mgr.get("a", feat(8))
    mgr.get("b", feat(8))
    mgr.get("a", feat(8))  # a is now most recent: b goes first
    mgr.get("c", feat(8))
    assert mgr.is_ready("a", feat(8)) and mgr.is_ready("c", feat(8)) and not mgr.is_ready("b", feat(8))
    [ev] = rec.named("blueprint_cache_evicted")
    assert (ev["blueprint"], ev["slot_shape"], ev["nbytes"]) == ("b", "features [N, 8]", linear_bytes(8))
    assert mgr.stats().cached_bytes == 2 * linear_bytes(8)
    mgr.get("huge", feat(64))  # larger than the whole bound: handed out, never cached, evicts nothing
    assert not mgr.is_ready("huge", feat(64)) and mgr.stats().lifetime.evictions == 1
    mgr.shutdown(1)


def test_zero_cache_builds_every_time() -> None:
    builder = Builder()
    mgr = manager(builder, cache_bytes=0)
    mgr.get("a", feat(4))
    mgr.get("a", feat(4))
    assert len(builder.calls) == 2 and mgr.stats().entries == 0
    mgr.shutdown(1)


def test_stats_are_windowed_and_resettable() -> None:
    mgr = manager(Builder())
    mgr.get("a", feat(4))
    mgr.get("a", feat(4))
    closed = mgr.reset_stats()
    assert (closed.gets, closed.hits, closed.misses, closed.hit_rate) == (2, 1, 1, 0.5)
    s = mgr.stats()
    assert s.window.gets == 0 and s.window.hit_rate is None and s.lifetime.gets == 2
    mgr.get("a", feat(4))
    s = mgr.stats()
    assert s.window.hit_rate == 1.0 and s.lifetime.hits == 2
    assert s.to_dict()["window"]["hit_rate"] == 1.0 and s.to_dict()["cached_bytes"] == linear_bytes(4)
    mgr.shutdown(1)


def test_module_nbytes_counts_parameters_and_buffers_once() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared, nn.BatchNorm1d(3))
    # 12 linear params; BN: weight+bias 6 float32, running mean/var 6 float32, num_batches_tracked 1 int64
    assert module_nbytes(model) == 12 * 4 + 6 * 4 + 6 * 4 + 8


def test_constructor_rejects_bad_bounds() -> None:
    with pytest.raises(ValueError):
        BlueprintLoadManager(Builder(), cache_bytes=-1, workers=1, timeout_ms=1)
    with pytest.raises(ValueError):
        BlueprintLoadManager(Builder(), cache_bytes=0, workers=0, timeout_ms=1)


# -- parameter ownership ----------------------------------------------------------------------------------


def test_ownership_conflicts_unregistered_and_reset_on_reregistration() -> None:
    host = nn.Linear(4, 4)
    seed = nn.Linear(4, 4)
    stray = nn.Parameter(torch.zeros(1))
    reg = ParameterOwnership()
    reg.register_host(host)
    reg.claim("seed1", seed.parameters())
    named = [*host.named_parameters(prefix="host"), *seed.named_parameters(prefix="seed1")]
    assert reg.validate(named) == []

    reg.claim("seed2", [host.weight])
    issues = reg.validate([*named, ("stray", stray)])
    assert issues == [
        OwnershipIssue("conflict", "host.weight", ("host", "seed2")),
        OwnershipIssue("unregistered", "stray", ()),
    ]
    reg.register_host(host)  # re-registration forgets every seed claim
    assert reg.owners(host.weight) == ("host",)
    issues = reg.validate(named)
    assert [(i.kind, i.param_name) for i in issues] == [("unregistered", "seed1.weight"),
                                                      ("unregistered", "seed1.bias")]


# -- compile time is budgeted apart from the load (issue 12 §10) -------------------------------------------


class SlowCompile:
    """A fake ``torch.compile`` that takes ``seconds`` (inductor compiling) or, with ``gate``, until released;
    ``entered`` is set once it runs."""

    def __init__(self, seconds: float | None = None) -> None:
        self.seconds = seconds
        self.entered = threading.Event()
        self.gate = threading.Event()

    def __call__(self, module: nn.Module) -> nn.Module:
        self.entered.set()
        self.gate.wait(self.seconds if self.seconds is not None else 30)
        return module


def test_compile_time_is_not_charged_to_the_load_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowCompile(seconds=1.0)  # five times the load budget
    monkeypatch.setattr(torch, "compile", slow)
    rec = EventRecorder()
    mgr = manager(Builder(), compile=True, timeout_ms=200, compile_timeout_ms=60_000, emit=rec)
    module = mgr.get("a", feat(4))
    assert slow.entered.is_set() and module.weight.shape == (4, 4)
    assert mgr.stats().window.timeouts == 0 and not rec.named("blueprint_load_timeout")
    assert mgr.prefetch("a", feat(4)).result(5).compiled is True
    mgr.shutdown(1)


def test_a_compile_over_its_own_budget_times_out_naming_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    slow = SlowCompile()  # held until released
    monkeypatch.setattr(torch, "compile", slow)
    rec = EventRecorder()
    mgr = manager(Builder(), compile=True, timeout_ms=60_000, compile_timeout_ms=100, emit=rec)
    with pytest.raises(BlueprintLoadError, match=r"seeds\.compile_timeout_ms"):
        mgr.get("a", feat(4))
    assert slow.entered.is_set() and mgr.stats().window.timeouts == 1
    assert "compile_timeout_ms" in rec.named("blueprint_load_timeout")[0]["reason"]
    slow.gate.set()
    assert mgr.prefetch("a", feat(4)).result(5).compiled is True  # the load still lands once the compile ends
    mgr.shutdown(1)


def test_a_slow_build_still_times_out_when_compile_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "compile", SlowCompile(seconds=0))
    builder = Builder()
    builder.gate = threading.Event()
    mgr = manager(builder, compile=True, timeout_ms=100, compile_timeout_ms=60_000)
    with pytest.raises(BlueprintLoadError, match=r"not ready within 100 ms \(seeds\.load_timeout_ms\)"):
        mgr.get("a", feat(4))
    builder.gate.set()
    mgr.shutdown(1)
