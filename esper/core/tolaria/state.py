"""The one state manager: what a checkpoint (and a fast-rollback snapshot) holds, captured and restored.

A training state is tensors (host + seed weights, optimizer state, RNG) plus a JSON payload (counters, seed
records, emergency and controller state, config). Nothing here pickles.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

import esper
from esper.core.errors import CheckpointError
from esper.core.kasmina.slot import SeedStats
from esper.statemachines import SEED, StrictMachine, TransitionRecord

if TYPE_CHECKING:
    from esper.core.tolaria.trainer import Trainer


@dataclass(frozen=True)
class Position:
    """Where in the run a state was taken: epochs completed and steps into the next epoch."""

    epochs_done: int
    step_in_epoch: int
    global_step: int


def checkpoint_name(pos: Position, reason: str) -> str:
    base = f"epoch-{pos.epochs_done:04d}"
    if pos.step_in_epoch:
        base += f"-step-{pos.global_step:08d}"
    return base + ("-emergency" if reason == "emergency" else "")


def capture(tr: Trainer, pos: Position, reason: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Tensors and payload describing the trainer at ``pos``."""
    model = {f"host.{k}": v for k, v in tr.host.state_dict().items()}
    model.update({f"seed.{k}": v for k, v in tr.kasmina.seed_tensors().items()})
    opt = tr.optimizer.state_dict()
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, st in opt["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                opt_tensors[f"{idx}.{key}"] = value
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    rng = {"torch": torch.get_rng_state()}
    tensors = {"model": model, "optimizer": opt_tensors, "rng": rng}
    if not opt_tensors:
        tensors.pop("optimizer")
    payload: dict[str, Any] = {
        "run_id": tr.run_id,
        "reason": reason,
        "epoch": pos.epochs_done,
        "step_in_epoch": pos.step_in_epoch,
        "global_step": pos.global_step,
        "saved_at": datetime.now(UTC).isoformat(),
        "trainer_state": tr.machine.state,
        "emergency": tr.emergency.state_dict(),
        "seeds": tr.kasmina.records(),
        "controller": tr.controller.state_dict() if tr.controller is not None else None,
        "metrics": tr.history[-1] if tr.history else {},
        "history": tr.history,
        "epoch_stats": tr.partial_stats(),
        "rollbacks": tr.rollbacks,
        "commands": dict(tr.commands),
        "optimizer": {"groups": groups, "scalars": opt_scalars, "kind": tr.cfg.trainer.optimizer},
        "config_toml": tr.cfg.to_toml(),
        "config_hash": tr.cfg.config_hash(),
        "versions": {"esper": esper.__version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    return tensors, payload


def restore(tr: Trainer, tensors: dict[str, dict[str, torch.Tensor]], payload: dict[str, Any]) -> Position:
    """Put a built trainer into the captured state. Any mismatch is a CheckpointError (nothing half-applied
    matters: the caller discards the trainer on failure)."""
    model = tensors.get("model", {})
    host_sd = {k.removeprefix("host."): v for k, v in model.items() if k.startswith("host.")}
    try:
        tr.host.load_state_dict(host_sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint model does not fit the configured host: {exc}") from exc
    records = {r["slot"]: r for r in payload["seeds"]}
    if set(records) != set(tr.kasmina.slots):
        raise CheckpointError(f"checkpoint slots {sorted(records)} != configured slots {sorted(tr.kasmina.slots)}")
    for name, slot in tr.kasmina.slots.items():
        rec = records[name]
        slot.machine = StrictMachine(SEED, name, observer=slot.machine.observer, initial=rec["stage"],
                                     history=[TransitionRecord(**h) for h in rec["history"]])
        slot.blueprint = rec["blueprint"]
        slot.seed_id = rec["seed_id"]
        slot.germinations = rec["germinations"]
        slot.stats = SeedStats.from_dict(rec["stats"])
        prefix = f"seed.{name}."
        seed_sd = {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}
        if seed_sd:
            if slot.blueprint is None:
                raise CheckpointError(f"checkpoint has seed tensors for slot {name} but no blueprint")
            slot.germinations -= 1
            module = tr.kasmina.build_module(slot.blueprint, slot.width, tr.kasmina.init_seed(slot))
            slot.germinations += 1
            try:
                module.load_state_dict(seed_sd, strict=True)
            except RuntimeError as exc:
                raise CheckpointError(f"seed tensors of slot {name} do not fit {slot.blueprint}: {exc}") from exc
            slot.module = module
        else:
            slot.module = None
    tr.rebuild_optimizer_fresh()
    opt = payload["optimizer"]
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.get("optimizer", {}).items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    for idx, scalars in opt["scalars"].items():
        state.setdefault(int(idx), {}).update(scalars)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in opt["groups"]]
    try:
        tr.optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"optimizer state does not fit the restored parameters: {exc}") from exc
    torch.set_rng_state(tensors["rng"]["torch"])
    tr.emergency.load_state_dict(payload["emergency"])
    if tr.controller is not None and payload.get("controller") is not None:
        tr.controller.load_state_dict(payload["controller"])
    tr.history = list(payload["history"])
    tr.rollbacks = list(payload["rollbacks"])
    tr.commands.clear()
    tr.commands.update(payload["commands"])
    tr.global_step = int(payload["global_step"])
    tr.restore_partial_stats(payload["epoch_stats"])
    return Position(int(payload["epoch"]), int(payload["step_in_epoch"]), int(payload["global_step"]))
