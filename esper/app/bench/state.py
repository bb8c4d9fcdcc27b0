"""P-2 (fast rollback restore vs a memcpy of the same bytes) and P-3/P-4 (verified checkpoint restore and write
vs safetensors' and torch.save's). Esper's side is the engine's own code: ``FastSnapshot`` over the tensors the
components' state dicts name, and the checkpoint store's ``write_checkpoint`` / ``load_checkpoint``.

``torch.save`` and ``torch.load(weights_only=True)`` appear here only as the P-4 and P-3 baselines: the only
file ever given to ``torch.load`` is the one ``torch.save`` wrote moments before in this process.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from esper.app.bench.stats import Absolute, BenchError, BenchPlan, Comparison, Result, alternate, gc_paused
from esper.core.checkpoint import load_checkpoint, write_checkpoint
from esper.core.checkpoint.background import BackgroundWriter
from esper.core.io.durable import fsync_dir, fsync_file
from esper.core.tolaria import Components, FastSnapshot, Layout, ModuleState, TorchOptimizerState

# ------------------------------------------------------------------------------------------------- P-2


def linear_stack(n_params: int, seed: int) -> tuple[nn.Sequential, torch.optim.Optimizer]:
    """A plain stack of Linear layers with about ``n_params`` parameters and SGD-momentum state.

    Values do not matter to a copy, so the layers skip their random init and are filled (which also
    touches every page, so no first-touch fault lands inside a timed round).
    """
    width = 256 if n_params < 1_000_000 else 1024 if n_params < 50_000_000 else 4096
    per_layer = width * width + width
    layers = max(1, round(n_params / per_layer))
    model = nn.Sequential(*(torch.nn.utils.skip_init(nn.Linear, width, width) for _ in range(layers)))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.fill_(float(torch.rand((), generator=gen)) + i)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # creates the momentum buffers, so the state holds optimizer tensors too
    opt.zero_grad(set_to_none=True)
    return model, opt


def stack_components(model: nn.Module, opt: torch.optim.Optimizer) -> Components:
    """A plain model and its optimizer as the engine's components (the same names and files as a run's)."""
    components = Components()
    components.register("model", ModuleState(model, "model"), Layout(file="model"))
    components.register("optimizer", TorchOptimizerState(opt, "sgd"), Layout(file="optimizer", key="optimizer"))
    return components


def _nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run_p2(get_tensors: Callable[[], dict[str, torch.Tensor]], label: str, params: int, plan: BenchPlan,
           sla_ms: float) -> tuple[Comparison, Absolute]:
    """FastSnapshot.restore_into (live tensors gathered as the rollback does) vs copy_ from preallocated buffers."""
    live = get_tensors()
    snapshot = FastSnapshot()
    captures: list[float] = []
    for _ in range(2):
        t0 = time.perf_counter()
        snapshot.capture(live)
        captures.append((time.perf_counter() - t0) * 1000.0)
    buffers = {k: torch.empty_like(v).copy_(v) for k, v in live.items()}
    pairs = [(live[k], buffers[k]) for k in live]

    def memcpy() -> float:
        return _memcpy_ms(pairs)

    def fast() -> float:
        t0 = time.perf_counter()
        snapshot.restore_into(get_tensors())
        return (time.perf_counter() - t0) * 1000.0

    with gc_paused():
        base, mine = alternate(memcpy, fast, warmup=plan.warmup, repeats=plan.repeats)
    nbytes = _nbytes(live)
    size = {"model": label, "params": params, "tensors": len(live), "bytes": nbytes}
    comp = Comparison(f"P-2/{label}", f"fast rollback restore ({label})", "ms", "copy_ from preallocated buffers",
                      "FastSnapshot.restore_into", base, mine, 1.5, size=size,
                      extra={"capture_ms": captures, "esper_GBps": nbytes / 1e6 / statistics.median(mine)})
    sla = Absolute(f"P-2/{label}/SLA", f"fast rollback latency ({label}) vs rollback.fast_sla_ms", "ms", mine,
                   goal_max=sla_ms, size=size)
    return comp, sla


# --------------------------------------------------------------------------------------------- P-3 / P-4


@contextmanager
def one_core() -> Iterator[int]:
    """The calling thread (and every thread it starts: the writer's hashing thread, the verifier's readers) on
    one core of those it may use, as on a machine whose other cores are busy; the affinity is put back after."""
    allowed = os.sched_getaffinity(0)
    core = min(allowed)
    os.sched_setaffinity(0, {core})
    try:
        yield core
    finally:
        os.sched_setaffinity(0, allowed)


def run_p3_p4(tensors: dict[str, dict[str, torch.Tensor]], payload: dict[str, Any], label: str, params: int,
              root: Path, plan: BenchPlan, keep_last: int, full_sla_ms: float) -> list[Result]:
    """P-4 write_checkpoint vs torch.save + fsync of the same tensors; P-3 load_checkpoint + restore into the
    live tensors vs torch.load(weights_only=True) + the same restore (what ``load_state_dict`` does: a copy_
    into each live tensor).

    Two informational pairs: write vs torch.save without fsync (what a plain ``torch.save`` call costs), and
    load vs safetensors' ``load_file`` (which memory-maps, so it need not read the data at all).
    """
    root.mkdir(parents=True, exist_ok=True)
    ckpt_root = root / "checkpoints"
    flat = {f"{stem}/{k}": v for stem, group in tensors.items() for k, v in group.items()}
    pt_path = root / "baseline.pt"
    counter = iter(range(1_000_000))
    written: list[Path] = []

    def save() -> float:
        t0 = time.perf_counter()
        torch.save(flat, pt_path)
        return (time.perf_counter() - t0) * 1000.0

    def save_synced() -> float:
        t0 = time.perf_counter()
        torch.save(flat, pt_path)
        fsync_file(pt_path)
        fsync_dir(root)
        return (time.perf_counter() - t0) * 1000.0

    def write() -> float:
        name = f"bench-{next(counter):06d}"
        t0 = time.perf_counter()
        written.append(write_checkpoint(ckpt_root, name, tensors, payload, keep_last=keep_last))
        return (time.perf_counter() - t0) * 1000.0

    with gc_paused():
        sb, sm = alternate(save_synced, write, warmup=plan.warmup, repeats=plan.repeats)
        wb, wm = alternate(save, write, warmup=0, repeats=plan.repeats)
    ckpt = written[-1]
    files = sorted(ckpt.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    size = {"model": label, "params": params, "files": len(files), "bytes": nbytes}
    p4 = Comparison(f"P-4/{label}", f"checkpoint write vs fsynced torch.save ({label})", "ms",
                    "torch.save + fsync(file, dir)", "write_checkpoint (atomic, fsynced, hashed while written)",
                    sb, sm, 1.0, size=size, extra={"torch_save_bytes": pt_path.stat().st_size})
    p4b = Comparison(f"P-4b/{label}", f"checkpoint write vs torch.save, no fsync ({label})", "ms",
                     "torch.save (no fsync)", "write_checkpoint", wb, wm, None, size=size)

    live = [(flat[f"{stem}/{k}"], stem, k) for stem, group in tensors.items() for k in group]

    def restore(get: Callable[[str, str], torch.Tensor]) -> None:
        with torch.no_grad():
            for dst, stem, k in live:
                dst.copy_(get(stem, k))

    def baseline() -> float:
        t0 = time.perf_counter()
        loaded = torch.load(pt_path, weights_only=True)  # the file torch.save wrote above, in this process
        restore(lambda stem, k: loaded[f"{stem}/{k}"])
        return (time.perf_counter() - t0) * 1000.0

    def verified() -> float:
        t0 = time.perf_counter()
        got = load_checkpoint(ckpt).tensors
        restore(lambda stem, k: got[stem][k])
        return (time.perf_counter() - t0) * 1000.0

    def raw() -> float:
        t0 = time.perf_counter()
        for f in files:
            safetensors.torch.load_file(f)
        return (time.perf_counter() - t0) * 1000.0

    with gc_paused():
        bb, bm = alternate(baseline, verified, warmup=plan.warmup, repeats=plan.repeats)
        rb, rm = alternate(raw, verified, warmup=0, repeats=plan.repeats)
    p3 = Comparison(f"P-3/{label}", f"verified restore vs torch.load + load_state_dict ({label})", "ms",
                    "torch.load(weights_only=True) + copy_ into live tensors",
                    "load_checkpoint (hashed as read) + copy_", bb, bm, 1.2, size=size)
    p3b = Comparison(f"P-3b/{label}", f"verified restore vs safetensors.load_file, mmap ({label})", "ms",
                     "safetensors.torch.load_file (mmap)", "load_checkpoint + copy_", rb, rm, None, size=size)
    sla = Absolute(f"P-3/{label}/SLA", f"verified load ({label}) vs full_sla_ms", "ms", bm + rm,
                   goal_max=full_sla_ms, size=size)
    pt_path.unlink()
    return [p3, p3b, sla, p4, p4b, _async_stall(tensors, payload, label, ckpt_root, plan, keep_last, size)]


def _async_stall(tensors: dict[str, dict[str, torch.Tensor]], payload: dict[str, Any], label: str, ckpt_root: Path,
                 plan: BenchPlan, keep_last: int, size: dict[str, Any]) -> Comparison:
    """P-4a (checkpoint.async): how long the loop stalls for a background checkpoint (staging into the reused
    buffers, the payload's copy, starting the thread) vs a copy_ of the same tensors into preallocated buffers.
    Each write is waited for outside the timed span, so one round's write never slows the next round's copy."""
    writer = BackgroundWriter()
    pairs = [(torch.empty_like(t), t) for group in tensors.values() for t in group.values()]
    counter = iter(range(1_000_000))
    writes: list[float] = []

    def memcpy() -> float:
        return _memcpy_ms(pairs)

    def stall() -> float:
        t0 = time.perf_counter()
        writer.submit(ckpt_root, f"async-{next(counter):06d}", writer.stage(tensors), payload, keep_last=keep_last)
        dt = (time.perf_counter() - t0) * 1000.0
        outcome = writer.wait()
        writes.append((time.perf_counter() - t0) * 1000.0)
        if outcome is None or outcome.error is not None:
            raise BenchError(f"background checkpoint write failed: {outcome.error if outcome else 'no outcome'}")
        return dt

    with gc_paused():
        base, mine = alternate(memcpy, stall, warmup=plan.warmup, repeats=plan.repeats)
    return Comparison(f"P-4a/{label}", f"async checkpoint: loop stall vs memcpy of the state ({label})", "ms",
                      "copy_ into preallocated buffers", "BackgroundWriter.stage + submit", base, mine, 1.5,
                      size=size, extra={"write_until_committed_ms": sorted(writes)})


def _memcpy_ms(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Milliseconds to copy every source tensor into its preallocated destination (the floor of a snapshot)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for dst, src in pairs:
            dst.copy_(src)
    return (time.perf_counter() - t0) * 1000.0
