"""Build-time checks of the slots against the host and the blueprints: everything a slot would only meet
mid-run is a ConfigError (exit 3) before any training, naming the key and the shapes."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from esper.core.config import SeedsConfig, SlotConfig
from esper.core.errors import ConfigError
from esper.core.kasmina.blending import BlendSpec
from esper.core.kasmina.blueprints import BlueprintRegistry
from esper.core.kasmina.kinds import SlotShape, resolve
from esper.core.model.host import HostProbe, shape_text


def slot_shapes(slots: Sequence[SlotConfig], probe: HostProbe) -> dict[str, SlotShape]:
    """Each slot's kind and shape, from its layer's probed output and its ``kind`` key."""
    return {sc.name: resolve(sc.kind, probe.shapes[sc.layer], f"seeds.slots[{i}]", sc.layer)
            for i, sc in enumerate(slots)}


def check_slots(seeds: SeedsConfig, run_seed: int, registry: BlueprintRegistry, spec: BlendSpec,
                shapes: dict[str, SlotShape], probe: HostProbe) -> None:
    """Every slot has a compatible blueprint, fits the blend mode, and every user blueprint builds for each
    slot it accepts, keeping the slot's shape."""
    for i, sc in enumerate(seeds.slots):
        shape = shapes[sc.name]
        if not registry.compatible(shape):
            why = "; ".join(registry[b].refusal(shape) for b in seeds.blueprints)
            hint = ""
            if shape.kind == "channels1d" and sc.kind == "auto":
                hint = (f"; if {sc.layer!r} outputs tokens [N, T, D] (a transformer's), set kind = \"tokens\" on "
                        f"the slot: {{ name = \"{sc.name}\", layer = \"{sc.layer}\", kind = \"tokens\" }}")
            raise ConfigError(f"seeds.slots[{i}] ({sc.name!r} at layer {sc.layer!r}, {shape}): no blueprint of "
                              f"seeds.blueprints {list(seeds.blueprints)} accepts it ({why}){hint}")
        for name in registry.compatible(shape):
            registry[name].bounds(shape)  # a user blueprint's declared bounds are checked here, not mid-run
    if spec.mode == "channel":
        n = len(spec.channel_alpha)
        bad = {name: str(s) for name, s in shapes.items() if s.channels != n}
        if bad:
            raise ConfigError(f"seeds.blend.channel_alpha has {n} entries but the slots' channel axes differ: {bad}; "
                              "it needs one entry per channel of every slot (axis 1 of channels1d/channels2d, "
                              "the last axis of features/tokens)")
    if spec.needs_logits and shapes and len(probe.output) != 1:
        raise ConfigError(f"seeds.blend.mode = 'confidence' gates on class logits [N, C]; the host outputs "
                          f"{shape_text(probe.output)}")
    for name in registry.user:
        for slot, shape in shapes.items():
            if registry[name].accepts(shape):
                _check_user_blueprint(registry, name, slot, shape, run_seed)


def _check_user_blueprint(registry: BlueprintRegistry, name: str, slot: str, shape: SlotShape, seed: int) -> None:
    key = f"seeds.user_blueprints.{name}"
    module = registry.build(name, shape, seed)  # a ConfigError naming the key when it is not a module
    with torch.no_grad():
        try:
            out = module(shape.zeros(2))
        except Exception as exc:  # noqa: BLE001 -- the user's module failing on the slot's shape is a config problem
            raise ConfigError(f"{key}: the module built for slot {slot!r} ({shape}) fails on a batch "
                              f"{list(shape.batched(2))}: {type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape.batched(2):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{key}: the module built for slot {slot!r} ({shape}) maps {list(shape.batched(2))} to "
                          f"{got}; a seed must keep its slot's shape (declare `kinds` on the factory to skip slots "
                          "it does not fit)")
