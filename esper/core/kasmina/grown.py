"""The grown network as a plain ``nn.Module``: the host with its kept seeds applied at fixed alphas.

What ``esper export`` writes and ``esper.load_model`` rebuilds. No lifecycle, no Kasmina, no run: each kept seed
is a submodule (``seeds.<slot>``), applied by a forward hook on its host layer with the blend of the run it came
from, through the same ``blend`` function the run used, so its outputs are the run's eval outputs bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.core.kasmina.blending import BlendSpec, blend
from esper.core.kasmina.kinds import SlotShape
from esper.core.model.host import select_output


@dataclass(frozen=True)
class KeptSeed:
    """A seed kept in the exported network: where it acts, at what alpha, on which activation."""

    slot: str
    layer: str
    shape: SlotShape
    alpha: float
    module: nn.Module


class GrownModel(nn.Module):
    """``host`` plus ``seeds`` (an ``nn.ModuleDict`` by slot name); ``forward(x)`` is the grown network's output
    (the tensor ``output`` names, for a host whose own output is not a tensor)."""

    def __init__(self, host: nn.Module, seeds: list[KeptSeed], spec: BlendSpec, output: str | int = "") -> None:
        super().__init__()
        self.host = host
        self.seeds = nn.ModuleDict({s.slot: s.module for s in seeds})
        self.spec = spec
        self.output = output
        self.alphas = {s.slot: s.alpha for s in seeds}
        self._bypass = False
        self._logits: torch.Tensor | None = None
        modules = dict(host.named_modules())
        for s in seeds:
            modules[s.layer].register_forward_hook(self._hook(s.slot, s.shape.channel_axis))

    def _hook(self, slot: str, channel_axis: int) -> Any:
        def apply(_m: nn.Module, _i: object, out: torch.Tensor) -> torch.Tensor:
            if self._bypass:
                return out
            seed = self.seeds[slot](out)
            return blend(out, seed, self.alphas[slot], self.spec, self._logits, channel_axis=channel_axis,
                         seed_input=out)
        return apply

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.needs_logits and len(self.seeds):
            # the confidence blend gates on the host's own logits: one host-only pass first, as the run did
            self._bypass = True
            try:
                with torch.no_grad():
                    self._logits = select_output(self.host(x), self.output)
            finally:
                self._bypass = False
        out: torch.Tensor = select_output(self.host(x), self.output)
        self._logits = None
        return out
