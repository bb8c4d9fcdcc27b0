"""The host network: a deliberately small MLP by default, or a user factory."""

from __future__ import annotations

import torch
from torch import nn

from esper.core import rng
from esper.core.config import EsperConfig
from esper.core.errors import ConfigError
from esper.core.plugins import call_factory, check_type, load_factory

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class MLPHost(nn.Module):
    """hidden1..N (Linear + activation) then a linear head; slots attach to the hidden layers' outputs."""

    def __init__(self, n_features: int, n_classes: int, widths: list[int], activation: str) -> None:
        super().__init__()
        dims = [n_features, *widths]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
            self.add_module(f"hidden{i}", nn.Sequential(nn.Linear(a, b), _ACT[activation]()))
        self.head = nn.Linear(dims[-1], n_classes)
        self.depth = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"hidden{i}")(x)
        return self.head(x)

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor:
        """The rest of the network after ``layer`` given its output ``h`` (slot hooks downstream still apply).

        Optional host protocol: a TRAINING seed's own loss then skips recomputing the layers below its slot.
        """
        start = int(layer.removeprefix("hidden"))
        for i in range(start + 1, self.depth + 1):
            h = getattr(self, f"hidden{i}")(h)
        return self.head(h)


def build_host(cfg: EsperConfig, n_features: int, n_classes: int) -> nn.Module:
    """Build the configured host (initialised from the run seed)."""
    rng.seed_global(cfg.run.seed)
    if cfg.host.factory == "mlp":
        return MLPHost(n_features, n_classes, cfg.host.hidden, cfg.host.activation)
    factory = load_factory(cfg.host.factory, "host.factory")
    host = call_factory(factory, cfg.host.factory, "host.factory", cfg, n_features, n_classes)
    return check_type(host, nn.Module, cfg.host.factory, "host.factory")


def layer_widths(host: nn.Module, layers: list[str], n_features: int) -> dict[str, int]:
    """Output width of each named layer, found by one probe forward; unknown layers are config errors."""
    names = dict(host.named_modules())
    missing = [name for name in layers if name not in names]
    if missing:
        raise ConfigError(f"seeds.slots: host has no layer {missing}; layers: {[n for n in names if n][:20]}",
                          key="seeds.slots")
    widths: dict[str, int] = {}
    handles = []
    for name in layers:
        def hook(_m: nn.Module, _i: object, out: torch.Tensor, name: str = name) -> None:
            if not isinstance(out, torch.Tensor) or out.dim() != 2:
                raise ConfigError(f"seeds.slots: layer {name!r} must output a [batch, features] tensor",
                                  key="seeds.slots")
            widths[name] = int(out.shape[1])
        handles.append(names[name].register_forward_hook(hook))
    try:
        with torch.no_grad():
            host(torch.zeros(2, n_features))
    finally:
        for h in handles:
            h.remove()
    return widths
