"""`esper layers`: the host's modules as a slot would see them, from one probe forward of a real example batch.

For each module: its type, its output shape for one sample, how many times it runs per forward (a slot needs a
layer that runs once), the slot kind it would get, and the blueprints that accept that kind with the parameter
count each would have there, within the budget or not. What a user needs to choose slots and a budget on a
network nobody here wrote.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from esper.app.preflight import preflight
from esper.core.config import EsperConfig
from esper.core.data import build_task
from esper.core.errors import ConfigError
from esper.core.kasmina import BlueprintRegistry, SlotShape, param_count
from esper.core.kasmina.blueprints import BUILTIN
from esper.core.kasmina.inherit import InheritError
from esper.core.kasmina.kinds import layout, resolve
from esper.core.model.host import build_host, inference, select_output


@dataclass
class Layer:
    name: str
    type: str
    output: str  # "[N, 64, 8, 8]", or the type of a non-tensor output
    runs: int  # times it ran in one forward (0: not on the forward path)
    kind: str  # the slot kind "auto" gives ("" when no slot can go there)
    tokens: bool  # a 3-D output that can also be a ``tokens`` slot (kind = "tokens")
    fits: dict[str, int] = field(default_factory=dict)  # blueprint -> parameters, within the budget
    over: dict[str, int] = field(default_factory=dict)  # blueprint -> parameters, over the budget
    why: str = ""  # why no slot can go here


@dataclass
class HostLayers:
    host: str
    params: int
    budget: int
    output: str
    layers: list[Layer]

    def to_doc(self) -> dict[str, Any]:
        return {"host": self.host, "params": self.params, "budget": self.budget, "output": self.output,
                "layers": [asdict(x) for x in self.layers]}


def _sizes(registry: BlueprintRegistry, names: list[str], shape: SlotShape, layer: nn.Module,
           activation: torch.Tensor) -> dict[str, int]:
    """Each blueprint's parameter count in a slot of ``shape`` after ``layer``; a copy of the layer only where it
    can be made (its output has its input's shape), tried on the layer's real ``activation``."""
    out = {}
    for b in names:
        if not registry[b].accepts(shape):
            continue
        if registry.inherits(b):
            try:
                registry.make(b, shape, 0, layer, activation[:2].detach())
            except InheritError:
                continue
        out[b] = registry.size(b, shape, layer)
    return out


def host_layers(cfg: EsperConfig) -> HostLayers:
    """Build the configured task and host (as ``train`` would, nothing written) and probe every module."""
    preflight(cfg)
    task = build_task(cfg)
    host = build_host(cfg, task.input_shape, task.n_outputs)
    n_params = param_count(host)
    budget = cfg.seeds.budget_for(n_params)
    every = [*BUILTIN, *cfg.seeds.user_blueprints]
    seeds = cfg.seeds.model_copy(update={"param_budget": budget, "blueprints": every})
    registry = BlueprintRegistry(seeds)
    x = task.example_x()
    seen: dict[str, list[object]] = {name: [] for name, _ in host.named_modules() if name}
    modules = dict(host.named_modules())
    handles = [modules[name].register_forward_hook(
        lambda _m, _i, out, name=name: seen[name].append(out)) for name in seen]
    try:
        with inference(host):
            out = select_output(host(x), cfg.host.output)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the user's host refusing the task's inputs is a config problem
        raise ConfigError(f"host.factory: the host ({type(host).__name__}) fails on the task's inputs "
                          f"{list(x.shape)} ({type(exc).__name__}: {exc})", key="host.factory") from exc
    finally:
        for h in handles:
            h.remove()
    rows = [_row(name, modules[name], outs, len(x), registry, every, budget) for name, outs in seen.items()]
    shown = layout(tuple(out.shape[1:])) if isinstance(out, torch.Tensor) else type(out).__name__
    return HostLayers(type(host).__name__, n_params, budget, shown, rows)


def _row(name: str, module: nn.Module, outs: list[object], n: int, registry: BlueprintRegistry,
         every: list[str], budget: int) -> Layer:
    row = Layer(name, type(module).__name__, "-", len(outs), "", False)
    if not outs:
        row.why = "not run by the forward"
        return row
    first = outs[0]
    if not isinstance(first, torch.Tensor):
        row.output = type(first).__name__
        row.why = "its output is not one tensor"
        return row
    row.output = layout(tuple(first.shape[1:]))
    if first.dim() < 2 or first.shape[0] != n:
        row.why = "its output has no batch axis first"
        return row
    try:
        shape = resolve("auto", tuple(int(d) for d in first.shape[1:]), "seeds.slots", name)
    except ConfigError:
        row.why = "no slot kind has this rank"
        return row
    row.kind = shape.kind
    sizes = _sizes(registry, every, shape, module, first)
    if shape.kind == "channels1d":
        row.tokens = True
        as_tokens = _sizes(registry, every, SlotShape("tokens", shape.shape), module, first)
        sizes.update({f"{b} (as tokens)": c for b, c in as_tokens.items()})
    row.fits = {b: c for b, c in sizes.items() if c <= budget}
    row.over = {b: c for b, c in sizes.items() if c > budget}
    if len(outs) > 1:
        row.why = f"runs {len(outs)} times per forward"
    return row
