"""Activation kinds (H-1): what a slot's layer outputs, and which axis of it holds the channels.

| kind | batched layout | channel axis |
|---|---|---|
| ``features`` | ``[N, D]`` | last (D) |
| ``channels1d`` | ``[N, C, L]`` | 1 (C) |
| ``channels2d`` | ``[N, C, H, W]`` | 1 (C) |
| ``tokens`` | ``[N, T, D]`` | last (D) |

The kind is inferred from the rank; a 3-D output is ``channels1d`` unless the slot's ``kind`` says ``tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from esper.core.config import KIND_RANK, KINDS
from esper.core.errors import ConfigError

LAYOUT: dict[str, str] = {"features": "[N, D]", "channels1d": "[N, C, L]", "channels2d": "[N, C, H, W]",
                          "tokens": "[N, T, D]"}
assert set(LAYOUT) == set(KINDS)
# per-sample rank (the batch axis not counted) -> the kinds of that rank; the first is what "auto" means
_BY_RANK: dict[int, tuple[str, ...]] = {r: tuple(k for k in KINDS if KIND_RANK[k] == r)
                                        for r in sorted(set(KIND_RANK.values()))}


def layout(shape: tuple[int, ...]) -> str:
    """A batched shape as people read it: ``[N, 6, 19]`` for one sample of shape ``(6, 19)``."""
    return "[" + ", ".join(["N", *(str(d) for d in shape)]) + "]"


@dataclass(frozen=True)
class SlotShape:
    """A slot's activation: its kind and one sample's shape (no batch axis), e.g. ``channels1d (6, 19)``."""

    kind: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown activation kind {self.kind!r}; known: {', '.join(KINDS)}")
        if len(self.shape) not in _BY_RANK or self.kind not in _BY_RANK[len(self.shape)]:
            raise ValueError(f"a {self.kind} activation is {LAYOUT[self.kind]}, not {layout(self.shape)}")
        if any(d < 1 for d in self.shape):
            raise ValueError(f"activation shape {layout(self.shape)} has an empty axis")

    @property
    def channel_axis(self) -> int:
        """The axis of the batched activation that holds the channels (``channel`` blending, conv blueprints)."""
        return 1 if self.kind in ("channels1d", "channels2d") else -1

    @property
    def channels(self) -> int:
        """Size of the channel axis: C for channels1d/2d, D for features and tokens."""
        return self.shape[0] if self.channel_axis == 1 else self.shape[-1]

    def batched(self, n: int) -> tuple[int, ...]:
        return (n, *self.shape)

    def zeros(self, n: int = 2) -> torch.Tensor:
        return torch.zeros(self.batched(n))

    def __str__(self) -> str:
        return f"{self.kind} {layout(self.shape)}"


def resolve(declared: str, shape: tuple[int, ...], key: str, layer: str) -> SlotShape:
    """The slot's kind from its layer's output shape and the declared ``kind``; a mismatch is a ConfigError
    naming ``key`` (``seeds.slots[i]``), the layer and the shapes."""
    kinds = _BY_RANK.get(len(shape))
    if kinds is None:
        known = ", ".join(f"{k} {v}" for k, v in LAYOUT.items())
        raise ConfigError(f"{key}.layer = {layer!r} outputs {layout(shape)} (rank {len(shape) + 1}); a slot takes "
                          f"{known}")
    if declared == "auto":
        kind = kinds[0]
    elif declared in kinds:
        kind = declared
    else:
        raise ConfigError(f"{key}.kind = {declared!r} contradicts layer {layer!r}, which outputs {layout(shape)}: "
                          f"{declared} is {LAYOUT[declared]}; that rank is {' or '.join(kinds)}")
    try:
        return SlotShape(kind, tuple(int(d) for d in shape))
    except ValueError as exc:
        raise ConfigError(f"{key}.layer = {layer!r}: {exc}") from exc
