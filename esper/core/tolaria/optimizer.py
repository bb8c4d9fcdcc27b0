"""The optimizer as a Stateful part (SPEC T-8): built over Kasmina's param groups, rebuilt with every group's
settings and state carried when seed parameters come or go, and every trained parameter owned by exactly one
of the host or a seed (Kasmina #19, #20) before any (re)build."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from esper.core.config import TrainerConfig
from esper.core.errors import CheckpointError
from esper.core.kasmina import Kasmina, ParameterOwnership
from esper.core.model.optim import OptimizerError, build_optimizer, rebuild_optimizer


def optimizer_state(optimizer: torch.optim.Optimizer, kind: str) -> dict[str, Any]:
    """A torch optimizer's state as a Stateful part's: ``groups`` (hyperparameters), ``scalars`` and ``kind``,
    and the state tensors (live) as ``<param index>.<key>``."""
    opt = optimizer.state_dict()
    out: dict[str, Any] = {
        "groups": [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]],
        "scalars": {},
        "kind": kind,
    }
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                out[f"{idx}.{key}"] = value
            else:
                out["scalars"].setdefault(str(idx), {})[key] = value
    return out


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Just the state tensors of :func:`optimizer_state` (live), without packing the rest."""
    out: dict[str, torch.Tensor] = {}
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor):
                    out[f"{index}.{key}"] = value
            index += 1
    return out


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """:func:`optimizer_state`'s inverse, into ``optimizer`` over the same parameters (tensors cloned: what it
    is given may be a snapshot's buffers). A state that does not fit is a CheckpointError."""
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            idx, _, name = key.partition(".")
            per_param.setdefault(int(idx), {})[name] = value.clone()
    for idx, scalars in state["scalars"].items():
        per_param.setdefault(int(idx), {}).update(scalars)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in state["groups"]]
    try:
        optimizer.load_state_dict({"state": per_param, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit the restored parameters: {exc}") from exc


class TorchOptimizerState:
    """A plain ``torch.optim.Optimizer`` as a Stateful part, in the run's optimizer layout (the bench's stacks)."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str) -> None:
        self.optimizer = optimizer
        self.kind = kind

    def state_dict(self) -> dict[str, Any]:
        return optimizer_state(self.optimizer, self.kind)

    def tensors(self) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state)


class OptimizerPart:
    """Holds the run's ``torch.optim.Optimizer`` (``.optimizer``; replaced on every rebuild)."""

    def __init__(self, cfg: TrainerConfig, kasmina: Kasmina, emit: Callable[..., Any]) -> None:
        self.cfg = cfg
        self.kasmina = kasmina
        self.emit = emit
        self.ownership = ParameterOwnership()
        self._named: list[tuple[str, nn.Parameter]] | None = None
        self.optimizer = self._fresh()

    def rebuild(self, why: str) -> None:
        """Seed parameters changed: new param groups, carrying every group's settings and state."""
        self._check_ownership()
        self.optimizer, report = rebuild_optimizer(self.optimizer, self.cfg, self.kasmina.param_groups())
        self.emit("tolaria", "optimizer.rebuilt", "INFO", reason=why, **report.to_dict())

    def named_params(self) -> list[tuple[str, nn.Parameter]]:
        """Every trained parameter by name; cached between rebuilds (the only time it changes)."""
        if self._named is None:
            named = list(self.kasmina.host.named_parameters())
            for s in self.kasmina.slots.values():
                if s.module is not None:
                    named.extend((f"{s.name}.{n}", p) for n, p in s.module.named_parameters())
            self._named = named
        return self._named

    def _fresh(self) -> torch.optim.Optimizer:
        self._check_ownership()
        return build_optimizer(self.cfg, self.kasmina.param_groups())

    def _check_ownership(self) -> None:
        """Every optimized parameter has exactly one owner: the host or one seed (a user blueprint that reuses
        host parameters is a conflict, never silently trained twice)."""
        self._named = None  # parameters are about to change
        self.ownership.register_host(self.kasmina.host)  # re-registering resets every earlier claim (#19)
        for s in self.kasmina.slots.values():
            if s.module is not None:
                self.ownership.claim(f"seed:{s.name}", s.params())
        issues = self.ownership.validate(self.named_params())
        if issues:
            self.emit("kasmina", "ownership.invalid", "ERROR", issues=[vars(i) for i in issues[:20]])
            raise OptimizerError(f"parameter ownership: {len(issues)} problem(s), first: {issues[0]}")

    # ---------------------------------------------------------------- Stateful
    def state_dict(self) -> dict[str, Any]:
        return optimizer_state(self.optimizer, self.cfg.optimizer)

    def tensors(self) -> dict[str, torch.Tensor]:
        return optimizer_tensors(self.optimizer)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Into the live optimizer when it holds the same parameters with the same state layout (copied in
        place); otherwise into a fresh one over Kasmina's current groups (state cloned)."""
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if self._same_layout(tensors, state["scalars"]):
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            with torch.no_grad():
                for key, value in tensors.items():
                    idx, _, name = key.partition(".")
                    self.optimizer.state[params[int(idx)]][name].copy_(value)
            for idx, scalars in state["scalars"].items():
                self.optimizer.state[params[int(idx)]].update(scalars)
            for live, saved in zip(self.optimizer.param_groups, state["groups"], strict=True):
                live.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
            return
        self.optimizer = self._fresh()
        load_optimizer_state(self.optimizer, state)

    def _same_layout(self, tensors: dict[str, torch.Tensor], scalars: dict[str, dict[str, Any]]) -> bool:
        specs = self.kasmina.param_groups()
        groups = self.optimizer.param_groups
        if [(s.name, [id(p) for p in s.params]) for s in specs] != \
                [(g["name"], [id(p) for p in g["params"]]) for g in groups]:
            return False
        live = self.state_dict()
        live_tensors = {k: v for k, v in live.items() if isinstance(v, torch.Tensor)}
        return ({k: (v.shape, v.dtype) for k, v in live_tensors.items()}
                == {k: (v.shape, v.dtype) for k, v in tensors.items()}
                and {i: set(s) for i, s in live["scalars"].items()} == {i: set(s) for i, s in scalars.items()})
