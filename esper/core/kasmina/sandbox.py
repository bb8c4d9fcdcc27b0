"""Esper's own extra forwards leave the host exactly as the host's own step left it.

A TRAINING seed's own pass, the G1 probe, the isolation probe and the confidence blend's host-only logits all run
the host in train mode. Left alone, each would move every BatchNorm ``running_mean``/``running_var`` and
``num_batches_tracked`` (the second time with the seed's activations substituted in) and draw dropout masks from
the global RNG, so the host would train differently because a seed exists, and a resumed run (which has not
cached the probes a straight run ran) would differ from the straight one. Seeds may change the host only through
their blended output; ``untouched`` makes that so for any registered buffer and every RNG stream.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from esper.core.errors import ConfigError


@dataclass
class Restored:
    """What one sandboxed forward would have changed: the names of the host buffers it moved (put back)."""

    moved: list[str] = field(default_factory=list)


def _cuda_devices(host: nn.Module) -> list[int]:
    return sorted({t.device.index or 0 for t in [*host.parameters(), *host.buffers()] if t.device.type == "cuda"})


@contextmanager
def untouched(host: nn.Module) -> Iterator[Restored]:
    """Run a block of extra forwards; afterwards every host buffer holds its value from before (copied back in
    place, so references stay valid) and the CPU and CUDA RNG streams are where they were. Yields a ``Restored``
    that lists, after the block, the buffers the block had moved."""
    saved = [(name, buf, buf.detach().clone()) for name, buf in host.named_buffers()]
    report = Restored()
    with torch.random.fork_rng(devices=_cuda_devices(host)):
        yield report
    now = dict(host.named_buffers())
    with torch.no_grad():
        for name, _buf, before in saved:
            buf = now.get(name)  # a forward may also have replaced the buffer object
            if buf is None or buf.shape != before.shape or buf.dtype != before.dtype:
                got = "gone" if buf is None else f"{list(buf.shape)} {buf.dtype}"
                raise ConfigError(
                    f"host.factory: the host's buffer {name!r} changed from {list(before.shape)} {before.dtype} to "
                    f"{got} during a forward; Esper puts host buffers back after its own extra forwards (a seed's "
                    "pass, the probes), so a buffer must keep its shape and dtype", key="host.factory")
            if not torch.equal(buf, before):
                report.moved.append(name)
                buf.copy_(before)


def buffers_equal(host: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    """Whether every host buffer still equals ``before`` (a ``snapshot``), bit for bit."""
    now = dict(host.named_buffers())
    return now.keys() == before.keys() and all(
        now[k].shape == v.shape and torch.equal(now[k], v) for k, v in before.items())


def snapshot(host: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf.detach().clone() for name, buf in host.named_buffers()}
