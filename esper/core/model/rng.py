"""Every touch of torch's global CPU RNG goes through one lock; :class:`RngState` is its Stateful part.

Blueprints are built on prefetch threads (each under its own seed), while the main thread saves and restores
the RNG for checkpoints and rollbacks. Unserialised, torch's generator mutex and the GIL can deadlock those
two (seen: ``set_rng_state`` on resume against ``fork_rng`` in a prefetch thread); waiting on a Python lock
releases the GIL, so only one thread is ever inside torch's generator code.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

RNG_LOCK = threading.RLock()
# torch generators take seeds in [0, 2**64); a seed derived from the run seed (the run seed times a constant plus
# the epoch, ...) is reduced into that range, so run.seed's whole schema range is usable by every consumer.
_SEED_SPACE = 2**64


def derive(*terms: int) -> int:
    """A generator seed from integer terms: their sum, wrapped into torch's seed range (unchanged when it fits)."""
    return sum(terms) % _SEED_SPACE


def get_state() -> torch.Tensor:
    with RNG_LOCK:
        return torch.get_rng_state()


def set_state(state: torch.Tensor) -> None:
    with RNG_LOCK:
        torch.set_rng_state(state)


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block on the global RNG seeded with ``seed``, restoring the previous state afterwards."""
    with RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def seed_global(seed: int) -> None:
    with RNG_LOCK:
        torch.manual_seed(seed)


class RngState:
    """The global CPU RNG as a Stateful part: ``{"torch": <its state as uint8>}``.

    Like every part's state dict, the tensor is live: one buffer, refreshed at every ``state_dict()``.
    """

    def __init__(self) -> None:
        self._buffer = get_state()

    def state_dict(self) -> dict[str, torch.Tensor]:
        with RNG_LOCK:
            self._buffer.copy_(torch.get_rng_state())
        return {"torch": self._buffer}

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        set_state(state["torch"])
