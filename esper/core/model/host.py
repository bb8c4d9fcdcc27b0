"""The host network: a deliberately small MLP by default, a conv stack (``cnn``), a GPT-style decoder
(``transformer``, in ``esper.core.model.transformer``), or a user factory; and the one
probe forward that learns what each slot's layer outputs.

Host protocol: an ``nn.Module`` whose ``forward(x)`` maps a batch of task inputs to outputs ``[N, n_outputs]``;
slots name its submodules (``host.named_modules()``). Optional: ``forward_from(layer, h)``, the output of the
network after ``layer`` given that layer's output ``h`` (``None`` for a layer it does not cover), which lets a
TRAINING seed's own loss skip the layers below its slot; Esper checks it against ``forward`` once at build.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from esper.core.config import EsperConfig, HostConfig
from esper.core.config.plugins import check_type, load_factory
from esper.core.errors import ConfigError
from esper.core.model import rng
from esper.core.model.transformer import TransformerHost

_ACT = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


def shape_text(shape: tuple[int, ...] | torch.Size, batch: str = "N") -> str:
    """``[N, 1, 8, 8]`` for one sample's shape ``(1, 8, 8)``."""
    return "[" + ", ".join([batch, *(str(d) for d in shape)]) + "]"


class _Blocks(nn.Module):
    """Numbered blocks ``<prefix>1..N`` then ``head``; ``forward_from`` resumes after any block."""

    prefix = ""
    depth = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, self.depth + 1):
            x = getattr(self, f"{self.prefix}{i}")(x)
        head: nn.Module = self.head
        return head(x)

    def forward_from(self, layer: str, h: torch.Tensor) -> torch.Tensor | None:
        """The rest of the network after block ``layer`` given its output ``h`` (slot hooks downstream still
        apply); ``None`` for a layer that is not one of the blocks (e.g. inside one)."""
        index = layer.removeprefix(self.prefix)
        if not layer.startswith(self.prefix) or not index.isdigit() or not 1 <= int(index) <= self.depth:
            return None
        for i in range(int(index) + 1, self.depth + 1):
            h = getattr(self, f"{self.prefix}{i}")(h)
        head: nn.Module = self.head
        return head(h)


class MLPHost(_Blocks):
    """hidden1..N (Linear + activation) then a linear head; slots attach to the hidden layers' outputs.
    Inputs of any shape are flattened first (``[N, 1, 40]`` is ``[N, 40]``)."""

    prefix = "hidden"

    def __init__(self, n_features: int, n_classes: int, widths: list[int], activation: str) -> None:
        super().__init__()
        dims = [n_features, *widths]
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True), start=1):
            self.add_module(f"hidden{i}", nn.Sequential(nn.Linear(a, b), _ACT[activation]()))
        self.head = nn.Linear(dims[-1], n_classes)
        self.depth = len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.flatten(1))


class CNNHost(_Blocks):
    """conv1..N (``ConvNd(c_in, c, k, stride, padding)`` [+ norm] + activation [+ dropout]) then ``head``
    (Flatten + Linear). ``host.norm = "batch"`` gives BatchNorm after each conv: the suite's stand-in for the
    BatchNorm networks users bring (torchvision's CPU build cannot be installed here).

    Inputs ``(C, L)`` get Conv1d, ``(C, H, W)`` Conv2d; slots attach to the conv blocks' outputs.
    """

    prefix = "conv"

    def __init__(self, input_shape: tuple[int, ...], n_outputs: int, cfg: HostConfig) -> None:
        super().__init__()
        conv = {2: nn.Conv1d, 3: nn.Conv2d}[len(input_shape)]
        c_in, *spatial = input_shape
        for i, (c, k) in enumerate(zip(cfg.channels, cfg.kernels, strict=True), start=1):
            spatial = [(s + 2 * cfg.padding - k) // cfg.stride + 1 for s in spatial]
            if any(s < 1 for s in spatial):
                raise ConfigError(
                    f"host.kernels/host.stride/host.padding: block conv{i} (kernel {k}, stride {cfg.stride}, "
                    f"padding {cfg.padding}) leaves nothing of inputs {shape_text(input_shape)} (output "
                    f"{shape_text((c, *spatial))}); use fewer blocks, smaller kernels or strides, or more padding")
            layers: list[nn.Module] = [conv(c_in, c, k, stride=cfg.stride, padding=cfg.padding)]
            if cfg.norm == "batch":
                layers.append((nn.BatchNorm1d if len(input_shape) == 2 else nn.BatchNorm2d)(c))
            elif cfg.norm == "group":
                layers.append(nn.GroupNorm(math.gcd(c, 4), c))
            layers.append(_ACT[cfg.activation]())
            if cfg.dropout > 0:
                layers.append(nn.Dropout(cfg.dropout))
            self.add_module(f"conv{i}", nn.Sequential(*layers))
            c_in = c
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c_in * math.prod(spatial), n_outputs))
        self.depth = len(cfg.channels)


def build_host(cfg: EsperConfig, input_shape: tuple[int, ...], n_outputs: int) -> nn.Module:
    """Build the configured host for inputs of one sample's shape ``input_shape`` (initialised from the run
    seed). A user factory is called as ``factory(cfg, input_shape, n_outputs)``."""
    rng.seed_global(cfg.run.seed)
    factory = cfg.host.factory
    if factory == "mlp":
        return MLPHost(math.prod(input_shape), n_outputs, cfg.host.hidden, cfg.host.activation)
    if factory == "cnn":
        if len(input_shape) not in (2, 3):
            raise ConfigError(f"host.factory = 'cnn' takes inputs [N, C, L] (Conv1d) or [N, C, H, W] (Conv2d); "
                              f"the task's inputs are {shape_text(input_shape)} (data.task = {cfg.data.task!r})",
                              key="host.factory")
        return CNNHost(input_shape, n_outputs, cfg.host)
    if factory == "transformer":
        if len(input_shape) != 1:
            raise ConfigError(f"host.factory = 'transformer' takes token ids [N, T]; the task's inputs are "
                              f"{shape_text(input_shape)} (data.task = {cfg.data.task!r}; try data.task = 'chars')")
        h = cfg.host
        return TransformerHost(n_outputs, input_shape[0], h.d_model, h.n_layers, h.n_heads, h.mlp_ratio, h.dropout)
    make = load_factory(factory, "host.factory")
    try:
        host = make(cfg, input_shape, n_outputs)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a user factory that cannot build for this input is a config problem
        raise ConfigError(f"host.factory = {factory!r}: the factory fails for inputs {shape_text(input_shape)} with "
                          f"{n_outputs} outputs ({type(exc).__name__}: {exc})", key="host.factory") from exc
    return check_type(host, nn.Module, factory, "host.factory")


# --------------------------------------------------------------------------------------------- outputs


def _tensor_fields(out: object) -> list[str]:
    """The names (or indices) under which a non-tensor output holds tensors: what ``host.output`` may name."""
    if isinstance(out, Mapping):
        return [repr(k) for k, v in out.items() if isinstance(v, torch.Tensor)]
    if isinstance(out, (tuple, list)):
        return [str(i) for i, v in enumerate(out) if isinstance(v, torch.Tensor)]
    if dataclasses.is_dataclass(out):
        return [repr(f.name) for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), torch.Tensor)]
    return []


def select_output(out: Any, key: str | int) -> Any:
    """The part of a host's output to train on (``host.output``): the output itself for ``""``, else the entry
    ``key`` of a dict or ``ModelOutput``, the attribute ``key`` of a dataclass, or the item ``key`` of a tuple."""
    if key == "":
        return out
    if isinstance(key, int):
        if isinstance(out, (tuple, list)) and -len(out) <= key < len(out):
            return out[key]
    elif isinstance(out, Mapping):
        if key in out:
            return out[key]
    elif hasattr(out, key):
        return getattr(out, key)
    fields = _tensor_fields(out)
    raise ConfigError(f"host.output = {key!r}: the host's output ({type(out).__name__}) has no such "
                      f"{'index' if isinstance(key, int) else 'entry'}; tensors it holds: "
                      f"{', '.join(fields) or 'none'}", key="host.output")


def _not_a_tensor(out: object, example_x: torch.Tensor) -> ConfigError:
    fields = _tensor_fields(out)
    hint = (f"; set host.output to the one to train on, e.g. host.output = {fields[0]} (it holds tensors at "
            f"{', '.join(fields)})" if fields else "")
    return ConfigError(f"host.factory: the host's output for inputs {list(example_x.shape)} is a "
                       f"{type(out).__name__}, not a tensor [N, ...] with the batch first{hint}", key="host.output")


# --------------------------------------------------------------------------------------------- probing


@dataclass(frozen=True)
class HostProbe:
    """What one forward of a real example batch showed: each probed layer's output shape (one sample's, no
    batch axis), the host output's shape (the same), and the batch itself (later build-time checks reuse it)."""

    shapes: dict[str, tuple[int, ...]]
    output: tuple[int, ...]
    example: torch.Tensor


@contextmanager
def inference(host: nn.Module) -> Iterator[None]:
    """Probe forwards learn shapes, never state: eval mode (no BatchNorm statistics, no dropout draws from the
    global RNG), no autograd; each submodule's mode is put back after."""
    modes = [(m, m.training) for m in host.modules()]
    host.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.train(training)


def _refused(host: nn.Module, example: torch.Tensor, exc: Exception) -> ConfigError:
    return ConfigError(f"host.factory: the host ({type(host).__name__}) refuses the task's inputs "
                       f"{list(example.shape)} ({type(exc).__name__}: {exc})")


def unknown_layers(host: nn.Module, layers: list[str]) -> ConfigError | None:
    """A ConfigError naming each layer the host does not have, with its closest names (``esper layers`` lists
    them all), or None when every layer exists."""
    names = [n for n, _ in host.named_modules() if n]
    missing = [name for name in layers if name not in dict(host.named_modules())]
    if not missing:
        return None
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    return ConfigError(f"seeds.slots: the host has no layer {'; '.join(hints)}; `esper layers` lists the host's "
                       f"{len(names)} layers with their output shapes", key="seeds.slots")


def probe_host(host: nn.Module, layers: list[str], example_x: torch.Tensor, output: str | int = "") -> HostProbe:
    """One forward of ``example_x`` (a real batch of task inputs) recording each named layer's output shape.

    Config errors (exit 3), naming the key and the shapes: an unknown layer, a layer whose output is not a
    batch tensor or that runs more than once per forward (a slot would act at every call), a host that
    refuses the input, a host whose output (after ``host.output``) is not a tensor.
    """
    unknown = unknown_layers(host, layers)
    if unknown is not None:
        raise unknown
    names = dict(host.named_modules())
    n = int(example_x.shape[0])
    shapes: dict[str, tuple[int, ...]] = {}
    calls = dict.fromkeys(layers, 0)
    handles = []
    for name in calls:  # each layer once: several slots may stack on one layer (their hooks chain in order)
        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            calls[name] += 1
            if not isinstance(out, torch.Tensor):
                raise ConfigError(f"seeds.slots: layer {name!r} outputs a {type(out).__name__}, not a tensor; "
                                  "a slot needs a layer whose output is one tensor [N, ...]", key="seeds.slots")
            if out.dim() < 2 or out.shape[0] != n:
                raise ConfigError(f"seeds.slots: layer {name!r} outputs {list(out.shape)} for a batch of {n} "
                                  f"inputs {list(example_x.shape)}; a slot needs [N, ...] with the batch first",
                                  key="seeds.slots")
            shapes[name] = tuple(int(d) for d in out.shape[1:])
        handles.append(names[name].register_forward_hook(hook))
    try:
        with inference(host):
            out = select_output(host(example_x), output)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the user's host refusing the input is a config problem, typed here
        raise _refused(host, example_x, exc) from exc
    finally:
        for h in handles:
            h.remove()
    twice = {name: c for name, c in calls.items() if c > 1}
    if twice:
        raise ConfigError(f"seeds.slots: layer(s) {', '.join(f'{k!r} ({c} times)' for k, c in twice.items())} run "
                          "more than once per forward (a module reused, like a shared ReLU), so a seed there would "
                          "act at every call; choose a layer that runs once (`esper layers` shows how often each "
                          "runs)", key="seeds.slots")
    if not isinstance(out, torch.Tensor):
        raise _not_a_tensor(out, example_x)
    if out.dim() < 1 or out.shape[0] != n:
        raise ConfigError(f"host.factory: the host's output for inputs {list(example_x.shape)} is "
                          f"{list(out.shape)}, not a tensor [N, ...] with the batch first")
    return HostProbe(shapes, tuple(int(d) for d in out.shape[1:]), example_x)


def layer_shapes(host: nn.Module, layers: list[str], example_x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Each named layer's output shape for one sample (no batch axis), found by one probe forward of a real
    example batch (contract C2)."""
    return probe_host(host, layers, example_x).shapes


def check_output(probe: HostProbe, n_outputs: int) -> None:
    """The host must produce one score per class (or vocabulary entry) on the last axis."""
    if not probe.output or probe.output[-1] != n_outputs:
        raise ConfigError(f"host.factory: the host outputs {shape_text(probe.output)} for inputs "
                          f"{shape_text(tuple(probe.example.shape[1:]))}, but the task has {n_outputs} outputs: "
                          f"expected [N, {n_outputs}]")


def resumes_from(host: nn.Module, layer: str, example_x: torch.Tensor, output: str | int = "") -> bool:
    """Whether the host's optional ``forward_from`` covers ``layer``; when it claims to, its output must equal
    ``forward``'s on the example batch (a wrong one would silently train TRAINING seeds on another network)."""
    forward_from = getattr(host, "forward_from", None)
    if forward_from is None:
        return False
    captured: list[torch.Tensor] = []
    handle = dict(host.named_modules())[layer].register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with inference(host):
            full = select_output(host(example_x), output)
            handle.remove()
            try:
                rest = forward_from(layer, captured[0])
            except Exception as exc:  # noqa: BLE001 -- a user host's protocol method failing is a config problem
                raise ConfigError(f"host.factory: forward_from({layer!r}, h) raised {type(exc).__name__}: {exc} "
                                  f"(h is {list(captured[0].shape)}); return None for a layer it does not cover"
                                  ) from exc
    finally:
        handle.remove()
    if rest is None:
        return False
    if not isinstance(rest, torch.Tensor) or rest.shape != full.shape or not torch.allclose(rest, full, rtol=1e-5,
                                                                                             atol=1e-6):
        got = list(rest.shape) if isinstance(rest, torch.Tensor) else type(rest).__name__
        raise ConfigError(f"host.factory: forward_from({layer!r}, h) disagrees with forward() on the example batch "
                          f"(got {got}, forward gives {list(full.shape)}); return None for a layer it does not "
                          "cover")
    return True
