"""Blueprint registry: named seed architectures with declared parameter bounds.

Every blueprint maps activations ``[N, w] -> [N, w]`` and returns ``x + delta(x)`` with the last layer of
``delta`` zero-initialised, so a freshly germinated seed is the identity and blending it in starts smoothly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from esper.core import rng
from esper.core.config import SeedsConfig
from esper.core.errors import ConfigError
from esper.core.plugins import call_factory, check_type, load_factory


@dataclass(frozen=True)
class Blueprint:
    """A named seed architecture; ``bounds(width)`` gives the (min, max) parameter count it may have."""

    name: str
    description: str
    build: Callable[[int], nn.Module]
    bounds: Callable[[int], tuple[int, int]]


class _Residual(nn.Module):
    def __init__(self, delta: nn.Module, last: nn.Linear) -> None:
        super().__init__()
        self.delta = delta
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


def _residual_mlp(width: int) -> nn.Module:
    hidden = 2 * width
    last = nn.Linear(hidden, width)
    return _Residual(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), last), last)


def _lowrank(width: int) -> nn.Module:
    rank = max(2, width // 4)
    last = nn.Linear(rank, width)
    return _Residual(nn.Sequential(nn.Linear(width, rank, bias=False), last), last)


class _Gated(nn.Module):
    """x + sigmoid(g(x)) * v(x): a GLU-style block that can switch its contribution off per feature."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gate = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.sigmoid(self.gate(x)) * self.value(x)


def _mlp_params(w: int) -> int:
    return w * 2 * w + 2 * w + 2 * w * w + w


def _lowrank_params(w: int) -> int:
    r = max(2, w // 4)
    return w * r + r * w + w


BUILTIN: dict[str, Blueprint] = {
    b.name: b
    for b in (
        Blueprint("residual_mlp", "x + MLP(x), hidden 2w", _residual_mlp, lambda w: (_mlp_params(w), _mlp_params(w))),
        Blueprint("lowrank", "x + B(A x), rank max(2, w/4) (LoRA-style adapter)", _lowrank,
                  lambda w: (_lowrank_params(w), _lowrank_params(w))),
        Blueprint("gated", "x + sigmoid(G x) * V x (gated linear unit)", _Gated,
                  lambda w: (2 * (w * w + w), 2 * (w * w + w))),
    )
}


class BlueprintRegistry:
    """Built-in blueprints plus the config's ``seeds.user_blueprints`` (``name -> module:function``)."""

    def __init__(self, cfg: SeedsConfig) -> None:
        self._items: dict[str, Blueprint] = dict(BUILTIN)
        for name, ref in cfg.user_blueprints.items():
            if name in self._items:
                raise ConfigError(f"seeds.user_blueprints.{name}: clashes with a built-in blueprint",
                                  key=f"seeds.user_blueprints.{name}")
            factory = load_factory(ref, f"seeds.user_blueprints.{name}")
            self._items[name] = Blueprint(name, f"user blueprint {ref}", _checked(factory, ref, name),
                                          lambda w, b=cfg.param_budget: (1, b))
        unknown = [b for b in cfg.blueprints if b not in self._items]
        if unknown:
            raise ConfigError(f"seeds.blueprints: unknown blueprint(s) {unknown}; known: {sorted(self._items)}",
                              key="seeds.blueprints")

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Blueprint:
        return self._items[name]

    def build(self, name: str, width: int, generator_seed: int) -> nn.Module:
        """Instantiate a blueprint with its own RNG stream, so init does not depend on global RNG history.

        Builds run on prefetch threads; ``rng.seeded`` serialises every use of the global RNG.
        """
        with rng.seeded(rng.derive(generator_seed, sum(name.encode()) * 131, width)):
            return self._items[name].build(width)


def _checked(factory: Callable[..., object], ref: str, name: str) -> Callable[[int], nn.Module]:
    def build(width: int) -> nn.Module:
        key = f"seeds.user_blueprints.{name}"
        return check_type(call_factory(factory, ref, key, width), nn.Module, ref, key)
    return build


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
