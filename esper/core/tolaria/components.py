"""The run's Stateful parts, in one named dict, and where each one's state lives in a checkpoint.

Every part exposes ``state_dict()`` / ``load_state_dict()`` (TorchTitan's Stateful). A state dict maps names
to tensors or JSON values; its tensors are the *live* ones (a consumer copies them: the checkpoint writer
serialises, the fast-rollback snapshot copies into its buffers). ``load_state_dict`` copies what it is given
into the live state, or clones it, and never keeps a reference: what it is given may be the snapshot's
buffers. Given its own live tensors back (the fast tier after an in-place copy), the copies are no-ops.

Checkpoint capture and restore, the fast-rollback snapshot and the bench all go through :class:`Components`;
restore runs in registration order (the host and the seeds before the optimizer that holds their parameters).
Each part's :class:`Layout` maps it onto the on-disk format v1, unchanged since the first release: tensors in
``<file>.safetensors`` under ``<prefix><key>``; the JSON values in the manifest, either as one object under
``key`` or as the top-level ``keys`` they always had. A new Stateful (a GradScaler, a sampler)
registers with a new manifest ``key`` of its own (and, if it has tensors, a file or a prefix).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from esper.core.errors import CheckpointError

PartState = dict[str, Any]
States = dict[str, PartState | None]  # None: a part this run does not have (no controller without seeds)
TensorFiles = dict[str, dict[str, torch.Tensor]]


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class WithTensors(Protocol):
    """A part with tensors may also hand out just those (live), without building its JSON state: the fast
    rollback's hot path asks for them on every restore."""

    def tensors(self) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class Layout:
    """Where one part's state lives in a checkpoint."""

    file: str | None = None  # safetensors stem of its tensors
    prefix: str = ""  # key prefix of its tensors in that file (parts may share a file by prefix)
    key: str | None = None  # manifest key holding its JSON values as one object ...
    keys: tuple[str, ...] = ()  # ... or the top-level manifest keys its JSON values are written under
    # the state of a part added after format v1's first release, when a checkpoint from before it lacks ``key``
    absent: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class _Entry:
    part: Stateful | None
    layout: Layout
    keep_on_rollback: bool | tuple[str, ...]
    tensors: Callable[[], dict[str, torch.Tensor]] | None  # the part's ``tensors()``, found once at registration


class ModuleState:
    """An ``nn.Module`` as a Stateful part whose mismatch is a CheckpointError naming what it is."""

    def __init__(self, module: nn.Module, what: str) -> None:
        self.module = module
        self.what = what

    def state_dict(self) -> dict[str, Any]:
        return dict(self.module.state_dict())

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()  # type: ignore[return-value]  # an OrderedDict of tensors

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint model does not fit the configured {self.what}: {exc}") from exc


class Components:
    """The named dict of Stateful parts."""

    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}

    def register(self, name: str, part: Stateful | None, layout: Layout, *,
                 keep_on_rollback: bool | tuple[str, ...] = False) -> None:
        """Add a part (``None``: absent from this run; its manifest ``key`` is then written as null).

        ``keep_on_rollback``: a rollback leaves the part as it is (True) or keeps those of its keys: what records
        the incident itself must survive the rollback it triggers."""
        if name in self._entries:
            raise ValueError(f"component {name!r} is registered twice")
        if layout.key is not None and layout.keys:
            raise ValueError(f"component {name!r}: give a manifest key or top-level keys, not both")
        if layout.file is not None:
            for other, e in self._entries.items():
                if e.layout.file == layout.file and (not e.layout.prefix or not layout.prefix
                                                     or e.layout.prefix == layout.prefix):
                    raise ValueError(f"components {other!r} and {name!r} would mix tensors in {layout.file}")
        tensors = getattr(part, "tensors", None)
        self._entries[name] = _Entry(part, layout, keep_on_rollback, tensors if callable(tensors) else None)

    def __getitem__(self, name: str) -> Stateful | None:
        return self._entries[name].part

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    # ------------------------------------------------------------------------------------------ live state
    def state_dict(self) -> States:
        return {name: e.part.state_dict() if e.part is not None else None for name, e in self._entries.items()}

    def load_state_dict(self, states: Mapping[str, PartState | None], *, rollback: bool = False) -> None:
        """Restore every part, in registration order. ``rollback``: the ``keep_on_rollback`` parts and keys
        keep their live state. A part given None (nothing saved for it) keeps its fresh state."""
        for name, e in self._entries.items():
            state = states[name]
            if e.part is None or state is None or (rollback and e.keep_on_rollback is True):
                continue
            if rollback and e.keep_on_rollback:
                live = e.part.state_dict()
                state = {**state, **{k: live[k] for k in e.keep_on_rollback}}
            e.part.load_state_dict(state)

    # ----------------------------------------------------------------------------------- checkpoint format
    def to_checkpoint(self, states: States) -> tuple[TensorFiles, dict[str, Any]]:
        """Tensor files and manifest payload of ``states`` (format v1). A file with no tensors is left out."""
        files: TensorFiles = {}
        payload: dict[str, Any] = {}
        for name, e in self._entries.items():
            state, lay = states[name], e.layout
            if state is None:
                if lay.key is not None:
                    payload[lay.key] = None
                continue
            tensors, values = _split(state)
            if tensors:
                if lay.file is None:
                    raise ValueError(f"component {name!r} has tensors but no file")
                files.setdefault(lay.file, {}).update({lay.prefix + k: v for k, v in tensors.items()})
            if lay.key is not None:
                payload[lay.key] = values
            elif set(values) != set(lay.keys):
                raise ValueError(f"component {name!r} wrote keys {sorted(values)}, its layout says {list(lay.keys)}")
            else:
                payload.update(values)
        return {f: t for f, t in files.items() if t}, payload

    def from_checkpoint(self, files: Mapping[str, Mapping[str, torch.Tensor]], payload: Mapping[str, Any]) -> States:
        """The per-part states a checkpoint holds; a key a part needs and the manifest lacks is a CheckpointError."""
        states: States = {}
        for name, e in self._entries.items():
            lay = e.layout
            if lay.key is not None and lay.key not in payload and lay.absent is not None:
                states[name] = json.loads(json.dumps(lay.absent))  # an older checkpoint: the part's stated default
                continue
            missing = [k for k in ((lay.key,) if lay.key is not None else lay.keys) if k not in payload]
            if missing:
                raise CheckpointError(f"checkpoint manifest has no {missing} (the state of {name})")
            if lay.key is not None and payload[lay.key] is None:
                states[name] = None
                continue
            state: PartState = dict(payload[lay.key]) if lay.key is not None else {k: payload[k] for k in lay.keys}
            if lay.file is not None:
                group = files.get(lay.file, {})
                state.update({k.removeprefix(lay.prefix): v for k, v in group.items() if k.startswith(lay.prefix)})
            states[name] = state
        return states

    # ------------------------------------------------------------------------------------ snapshot layout
    def live_tensors(self) -> dict[str, torch.Tensor]:
        """Every live tensor, by its stable name; only the parts that have tensors are asked (the fast tier's and
        the bench's hot path: no JSON state is built)."""
        flat: dict[str, torch.Tensor] = {}
        for e in self._entries.values():
            if e.part is None or e.layout.file is None:
                continue
            tensors = e.tensors() if e.tensors is not None else _split(e.part.state_dict())[0]
            head = f"{e.layout.file}/{e.layout.prefix}"
            for k, v in tensors.items():
                flat[head + k] = v
        return flat

    def flatten(self, states: States) -> dict[str, torch.Tensor]:
        """Every tensor of ``states`` under one stable name, ``<file>/<prefix><key>`` (as in the checkpoint)."""
        flat: dict[str, torch.Tensor] = {}
        for name, e in self._entries.items():
            state = states[name]
            if state is not None and e.layout.file is not None:
                for k, v in _split(state)[0].items():
                    flat[f"{e.layout.file}/{e.layout.prefix}{k}"] = v
        return flat

    def values(self, states: States) -> States:
        """The JSON half of ``states``, as a private deep copy (later mutation of the live parts cannot leak in)."""
        return {name: json.loads(json.dumps(_split(s)[1])) if s is not None else None for name, s in states.items()}

    def unflatten(self, flat: Mapping[str, torch.Tensor], values: States) -> States:
        """``flatten``'s inverse: per-part states from flat tensors and the JSON halves (tensors not copied)."""
        states: States = {}
        for name, e in self._entries.items():
            v = values[name]
            if v is None:
                states[name] = None
                continue
            state: PartState = dict(v)
            if e.layout.file is not None:
                head = f"{e.layout.file}/{e.layout.prefix}"
                state.update({k.removeprefix(head): t for k, t in flat.items() if k.startswith(head)})
            states[name] = state
        return states


def _split(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return tensors, {k: v for k, v in state.items() if k not in tensors}
