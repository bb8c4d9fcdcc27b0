"""Gradient isolation monitor (T-5): host/seed gradient overlap as a cosine on an O(k) sample."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn


class IsolationMonitor:
    """Samples ``k`` fixed gradient coordinates across parameters (never ``randperm(numel)``)."""

    def __init__(self, params: Sequence[torch.nn.Parameter], k: int, seed: int) -> None:
        total = sum(p.numel() for p in params)
        gen = torch.Generator().manual_seed(seed)
        self.params = list(params)
        self.index: list[torch.Tensor] = []
        for p in self.params:
            share = max(1, math.ceil(k * p.numel() / max(total, 1)))
            self.index.append(torch.randint(0, p.numel(), (min(share, p.numel()),), generator=gen))

    @property
    def sample_size(self) -> int:
        return sum(int(i.numel()) for i in self.index)

    def sample(self, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The sampled coordinates of ``grads`` (None -> zeros), as one vector of length ``sample_size``."""
        parts = []
        for idx, g, p in zip(self.index, grads, self.params, strict=True):
            if g is None:
                parts.append(torch.zeros(idx.numel(), dtype=p.dtype))
            else:
                parts.append(g.detach().reshape(-1).index_select(0, idx).to("cpu"))
        return torch.cat(parts) if parts else torch.zeros(0)

    @staticmethod
    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        """|cos(a, b)|; 0 when either vector is zero (no overlap)."""
        na, nb = float(a.norm()), float(b.norm())
        if na == 0.0 or nb == 0.0:
            return 0.0
        return abs(float(a @ b) / (na * nb))


def upstream_params(host: nn.Module, layer: str, x: torch.Tensor,
                    bypassed: Callable[[], AbstractContextManager[object]],
                    run: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[nn.Parameter]:
    """Host parameters the output of ``layer`` depends on (where a seed's leak would land), less those the
    network also uses after it (a head tied to the embedding): their gradient from the seed's loss is no leak.
    ``bypassed()`` runs the host with every slot bypassed; ``x`` is a small probe batch; ``run`` is the host's
    forward reduced to its trained tensor (``host.output``), the host itself by default."""
    forward = run if run is not None else host
    captured: list[torch.Tensor] = []
    module = dict(host.named_modules())[layer]
    params = [p for p in host.parameters() if p.requires_grad]
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with bypassed():
            forward(x)
        handle.remove()
        handle = module.register_forward_hook(lambda _m, _i, out: out.detach())
        with bypassed():
            after = forward(x)
    finally:
        handle.remove()
    grads = torch.autograd.grad(captured[0].sum(), params, allow_unused=True)
    later = (torch.autograd.grad(after.sum(), params, allow_unused=True) if after.requires_grad
             else [None] * len(params))
    return [p for p, g, d in zip(params, grads, later, strict=True) if g is not None and d is None]
