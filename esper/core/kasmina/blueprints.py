"""Blueprint registry: named seed architectures, the activation kinds each accepts, and exact parameter bounds
as a function of the slot's shape.

Every blueprint maps its slot's activation to one of the same shape and returns ``x + delta(x)`` with the last
layer of ``delta`` zero-initialised, so a freshly germinated seed is the identity and blending it in starts
smoothly. The MLP-style ones act on the last axis (``features`` ``[N, D]``, ``tokens`` ``[N, T, D]``); the conv
ones on the channel axis of ``channels1d`` ``[N, C, L]`` (Conv1d, kernel 5) and ``channels2d`` ``[N, C, H, W]``
(Conv2d, 3x3: the usual image kernel, and 9 taps per channel pair against the 1-D block's 5). ``block`` and
``attention`` take ``tokens`` ``[N, T, D]`` only: they mix positions, causally (``esper.core.model.transformer``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import nn

from esper.core.config import KINDS, SeedsConfig
from esper.core.config.plugins import call_factory, check_type, load_factory
from esper.core.errors import ConfigError
from esper.core.kasmina.inherit import copy_layer
from esper.core.kasmina.kinds import SlotShape
from esper.core.model import rng
from esper.core.model.transformer import AttentionSeed, BlockSeed, attention_params, block_params

LAST_AXIS = frozenset({"features", "tokens"})
TOKENS = frozenset({"tokens"})
CHANNELS = frozenset({"channels1d", "channels2d"})


@dataclass(frozen=True)
class Blueprint:
    """A named seed architecture for the slot kinds in ``kinds``; ``bounds(shape)`` gives the (min, max)
    parameter count it may have in a slot of that shape."""

    name: str
    description: str
    kinds: frozenset[str]
    build: Callable[[SlotShape], nn.Module]
    bounds: Callable[[SlotShape], tuple[int, int]]
    inherits: str = ""  # "zeroed" | "exact": a copy of the slot's trained layer (``inherit``), not a fresh build

    def accepts(self, shape: SlotShape) -> bool:
        return shape.kind in self.kinds

    def refusal(self, shape: SlotShape) -> str:
        """Why this blueprint cannot grow in a slot of ``shape`` ('' when it can)."""
        if self.accepts(shape):
            return ""
        return f"blueprint {self.name!r} takes {', '.join(sorted(self.kinds))} slots, not {shape}"


class _Residual(nn.Module):
    def __init__(self, delta: nn.Module, last: nn.Module) -> None:
        super().__init__()
        self.delta = delta
        assert isinstance(last.weight, torch.Tensor) and isinstance(last.bias, torch.Tensor)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.delta(x)


def _residual_mlp(s: SlotShape) -> nn.Module:
    width = s.channels
    hidden = 2 * width
    last = nn.Linear(hidden, width)
    return _Residual(nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), last), last)


def _lowrank(s: SlotShape) -> nn.Module:
    width = s.channels
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


def _mlp_params(s: SlotShape) -> int:
    w = s.channels
    return w * 2 * w + 2 * w + 2 * w * w + w


def _lowrank_params(s: SlotShape) -> int:
    w = s.channels
    r = max(2, w // 4)
    return w * r + r * w + w


def _gated_params(s: SlotShape) -> int:
    w = s.channels
    return 2 * (w * w + w)


# --- conv blueprints (channels1d: Conv1d, kernel 5; channels2d: Conv2d, 3x3), stride 1 and "same" padding ---

CONV_EXPANSION = 4


def _kernel(s: SlotShape) -> int:
    return 5 if s.kind == "channels1d" else 3


def _taps(s: SlotShape) -> int:
    """Weights per (input, output) channel pair of one conv kernel."""
    k = _kernel(s)
    return k if s.kind == "channels1d" else k * k


def _conv(s: SlotShape, c_in: int, c_out: int, k: int, groups: int = 1) -> nn.Module:
    cls = nn.Conv1d if s.kind == "channels1d" else nn.Conv2d
    return cls(c_in, c_out, k, padding=k // 2, groups=groups)


def _conv_block(s: SlotShape) -> nn.Module:
    """x + Conv(4C -> C)(ReLU(Conv(C -> 4C)(x))): a residual conv block."""
    c, k = s.channels, _kernel(s)
    last = _conv(s, CONV_EXPANSION * c, c, k)
    return _Residual(nn.Sequential(_conv(s, c, CONV_EXPANSION * c, k), nn.ReLU(), last), last)


def _conv_dwsep(s: SlotShape) -> nn.Module:
    """x + PW(4C -> C)(ReLU(DW(4C)(ReLU(PW(C -> 4C)(x))))): a depthwise-separable (inverted bottleneck) block."""
    c, k = s.channels, _kernel(s)
    hidden = CONV_EXPANSION * c
    last = _conv(s, hidden, c, 1)
    return _Residual(nn.Sequential(_conv(s, c, hidden, 1), nn.ReLU(), _conv(s, hidden, hidden, k, groups=hidden),
                                   nn.ReLU(), last), last)


BOTTLENECK_REDUCTION = 4


def _bottleneck_width(s: SlotShape) -> int:
    return max(4, s.channels // BOTTLENECK_REDUCTION)


def _conv_bottleneck(s: SlotShape) -> nn.Module:
    """x + PW(b -> C)(ReLU(Conv k(b -> b)(ReLU(PW(C -> b)(x))))), b = max(4, C/4): ResNet's bottleneck, so the
    seed grows with C (about 2.6C^2 parameters at 3x3, not 72C^2): it fits the wide stages of real CNNs."""
    c, b, k = s.channels, _bottleneck_width(s), _kernel(s)
    last = _conv(s, b, c, 1)
    return _Residual(nn.Sequential(_conv(s, c, b, 1), nn.ReLU(), _conv(s, b, b, k), nn.ReLU(), last), last)


def _conv_bottleneck_params(s: SlotShape) -> int:
    c, b = s.channels, _bottleneck_width(s)
    return (c * b + b) + (b * b * _taps(s) + b) + (b * c + c)


def _conv_block_params(s: SlotShape) -> int:
    c = s.channels
    return 2 * CONV_EXPANSION * c * c * _taps(s) + CONV_EXPANSION * c + c


def _conv_dwsep_params(s: SlotShape) -> int:
    c = s.channels
    h = CONV_EXPANSION * c
    return (c * h + h) + (h * _taps(s) + h) + (h * c + c)


def _exact(count: Callable[[SlotShape], int]) -> Callable[[SlotShape], tuple[int, int]]:
    return lambda s: (count(s), count(s))


def _from_layer(_s: SlotShape) -> nn.Module:
    raise TypeError("a blueprint that copies the host's layer is made by BlueprintRegistry.make, from the layer")


BUILTIN: dict[str, Blueprint] = {
    b.name: b
    for b in (
        Blueprint("residual_mlp", "x + MLP(x) on the last axis, hidden 2w", LAST_AXIS, _residual_mlp,
                  _exact(_mlp_params)),
        Blueprint("lowrank", "x + B(A x) on the last axis, rank max(2, w/4) (LoRA-style adapter)", LAST_AXIS,
                  _lowrank, _exact(_lowrank_params)),
        Blueprint("gated", "x + sigmoid(G x) * V x on the last axis (gated linear unit)", LAST_AXIS,
                  lambda s: _Gated(s.channels), _exact(_gated_params)),
        Blueprint("conv_block", "x + Conv(4C->C)(ReLU(Conv(C->4C)(x))), kernel 5 (1-D) or 3x3 (2-D)", CHANNELS,
                  _conv_block, _exact(_conv_block_params)),
        Blueprint("conv_dwsep", "x + PW(ReLU(DW(ReLU(PW(x))))), 4C hidden, depthwise kernel 5 (1-D) or 3x3 (2-D)",
                  CHANNELS, _conv_dwsep, _exact(_conv_dwsep_params)),
        Blueprint("conv_bottleneck", "x + PW(b->C)(ReLU(Conv(b->b)(ReLU(PW(C->b)(x))))), b = max(4, C/4), kernel 5 "
                  "(1-D) or 3x3 (2-D): sized to the slot", CHANNELS, _conv_bottleneck, _exact(_conv_bottleneck_params)),
        Blueprint("block", "a pre-norm transformer block (causal attention + MLP 4w), output projections zeroed",
                  TOKENS, lambda s: BlockSeed(s.channels), _exact(lambda s: block_params(s.channels))),
        Blueprint("attention", "x + causal self-attention(LayerNorm(x)), output projection zeroed", TOKENS,
                  lambda s: AttentionSeed(s.channels), _exact(lambda s: attention_params(s.channels))),
        Blueprint("layer_copy", "a copy of the trained layer the slot follows, its output projections (or last "
                  "norm) zeroed: the identity at birth (LLaMA-Pro); residual blocks whose output has their input's "
                  "shape",
                  LAST_AXIS | CHANNELS, _from_layer, lambda s: (0, 0), inherits="zeroed"),
        Blueprint("layer_stack", "an exact copy of the trained layer the slot follows (G_stack): the layer runs "
                  "twice at alpha 1; layers whose output has their input's shape", LAST_AXIS | CHANNELS,
                  _from_layer, lambda s: (0, 0), inherits="exact"),
    )
}


def _init_key(shape: SlotShape) -> int:
    """The part of a blueprint's init stream that depends on the slot: its shape, not its name, so equal-shape
    slots get the same initial seed. For ``features`` it is the width, as before kinds existed, so runs that
    only have feature slots keep their results bit for bit."""
    return sum(d * 1009**i for i, d in enumerate(reversed(shape.shape)))


class BlueprintRegistry:
    """Built-in blueprints plus the config's ``seeds.user_blueprints`` (``name -> module:function``).

    A user factory is called as ``factory(kind, shape)`` (kind a string, shape one sample's activation shape,
    e.g. ``("channels1d", (6, 19))``) and returns an ``nn.Module`` mapping ``[N, *shape]`` to the same shape.
    Optional attributes on the factory: ``kinds`` (the slot kinds it accepts; every kind when absent) and
    ``bounds(kind, shape) -> (min, max)`` (its parameter count; ``(1, seeds.param_budget)`` when absent).
    """

    def __init__(self, cfg: SeedsConfig) -> None:
        self._items: dict[str, Blueprint] = dict(BUILTIN)
        for name, ref in cfg.user_blueprints.items():
            if name in self._items:
                raise ConfigError(f"seeds.user_blueprints.{name}: clashes with a built-in blueprint",
                                  key=f"seeds.user_blueprints.{name}")
            key = f"seeds.user_blueprints.{name}"
            factory = load_factory(ref, key)
            self._items[name] = Blueprint(name, f"user blueprint {ref}", _declared_kinds(factory, key),
                                          _checked(factory, ref, key), _user_bounds(factory, key, cfg))
        unknown = [b for b in cfg.blueprints if b not in self._items]
        if unknown:
            raise ConfigError(f"seeds.blueprints: unknown blueprint(s) {unknown}; known: {sorted(self._items)}",
                              key="seeds.blueprints")
        self._allowed = list(cfg.blueprints)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __getitem__(self, name: str) -> Blueprint:
        return self._items[name]

    @property
    def user(self) -> list[str]:
        return [n for n in self._items if n not in BUILTIN]

    def compatible(self, shape: SlotShape) -> list[str]:
        """The blueprints of ``seeds.blueprints`` (in its order) that accept a slot of ``shape``."""
        return [b for b in self._allowed if self._items[b].accepts(shape)]

    def inherits(self, name: str) -> bool:
        return bool(self._items[name].inherits)

    def size(self, name: str, shape: SlotShape, layer: nn.Module) -> int:
        """The parameter count ``name`` has in a slot of ``shape`` after ``layer`` (the most its bounds allow)."""
        return param_count(layer) if self.inherits(name) else self._items[name].bounds(shape)[1]

    def make(self, name: str, shape: SlotShape, generator_seed: int, layer: nn.Module,
             activation: torch.Tensor | None = None) -> nn.Module:
        """A seed of ``name`` for a slot of ``shape`` after ``layer``: built, or for an inheriting blueprint copied
        from ``layer`` as it is now (checked on ``activation``, a real one at the slot; zeros without)."""
        if not self.inherits(name):
            return self.build(name, shape, generator_seed)
        return copy_layer(layer, self._items[name].inherits, activation if activation is not None else shape.zeros(2))

    def build(self, name: str, shape: SlotShape, generator_seed: int) -> nn.Module:
        """Instantiate a blueprint with its own RNG stream, so init does not depend on global RNG history.

        Builds run on prefetch threads; ``rng.seeded`` serialises every use of the global RNG.
        """
        with rng.seeded(rng.derive(generator_seed, sum(name.encode()) * 131, _init_key(shape))):
            return self._items[name].build(shape)


def _declared_kinds(factory: Callable[..., object], key: str) -> frozenset[str]:
    kinds = getattr(factory, "kinds", KINDS)
    if isinstance(kinds, str) or not isinstance(kinds, Collection) or not kinds:
        raise ConfigError(f"{key}: the factory's `kinds` must be a non-empty list of {', '.join(KINDS)}; "
                          f"got {kinds!r}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ConfigError(f"{key}: the factory's `kinds` names unknown kind(s) {unknown}; known: {', '.join(KINDS)}")
    return frozenset(kinds)


def _checked(factory: Callable[..., object], ref: str, key: str) -> Callable[[SlotShape], nn.Module]:
    def build(shape: SlotShape) -> nn.Module:
        return check_type(call_factory(factory, ref, key, shape.kind, shape.shape), nn.Module, ref, key)
    return build


def _user_bounds(factory: Callable[..., object], key: str, cfg: SeedsConfig
                 ) -> Callable[[SlotShape], tuple[int, int]]:
    declared = getattr(factory, "bounds", None)
    if declared is None:
        return lambda _s: (1, cfg.budget)  # read when asked: a relative budget is resolved by then
    if not callable(declared):
        raise ConfigError(f"{key}: the factory's `bounds` must be callable as bounds(kind, shape) -> (min, max)")

    def bounds(shape: SlotShape) -> tuple[int, int]:
        got = declared(shape.kind, shape.shape)
        if (not isinstance(got, tuple) or len(got) != 2 or not all(isinstance(v, int) for v in got)
                or not 0 <= got[0] <= got[1]):
            raise ConfigError(f"{key}: bounds({shape.kind!r}, {shape.shape}) returned {got!r}, "
                              "expected (min, max) integers with 0 <= min <= max")
        return got
    return bounds


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
