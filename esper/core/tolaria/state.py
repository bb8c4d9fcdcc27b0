"""The one state manager: what a checkpoint (and a fast-rollback snapshot) holds, captured and restored.

A training state is tensors (host + seed weights, optimizer state, RNG) plus a JSON payload (counters, seed
records, emergency and controller state, config). Nothing here pickles.
"""

from __future__ import annotations

import copy
import platform
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch

import esper
from esper.core import rng
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


def capture(tr: Trainer, pos: Position, reason: str, *, with_tensors: bool = True,
            ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """Tensors and payload describing the trainer at ``pos`` (``with_tensors=False``: payload only)."""
    if not with_tensors:
        return {}, _payload(tr, pos, reason, _opt_json(tr)[0], _opt_json(tr)[1])
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
    rng_state = {"torch": rng.get_state()}
    tensors = {"model": model, "optimizer": opt_tensors, "rng": rng_state}
    if not opt_tensors:
        tensors.pop("optimizer")
    return tensors, _payload(tr, pos, reason, groups, opt_scalars)


def _opt_json(tr: Trainer) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    opt = tr.optimizer.state_dict()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
    scalars = {str(i): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
               for i, st in opt["state"].items()}
    return groups, {i: v for i, v in scalars.items() if v}


def _payload(tr: Trainer, pos: Position, reason: str, groups: list[dict[str, Any]],
             opt_scalars: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
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


def restore(tr: Trainer, tensors: dict[str, dict[str, torch.Tensor]], payload: dict[str, Any], *,
            rollback: bool = False) -> Position:
    """Put a built trainer into the captured state; any mismatch is a CheckpointError.

    ``rollback=True`` keeps what must survive a rollback: the emergency incident, the rollback log and the
    command counters; the controller is rewound instead of replaced.
    """
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
        prefix = f"seed.{name}."
        seed_sd = {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}
        if not seed_sd:
            slot.module = None
            continue
        if rec["blueprint"] is None:
            raise CheckpointError(f"checkpoint has seed tensors for slot {name} but no blueprint")
        module = tr.kasmina.build_module(rec["blueprint"], slot.width)  # weights: the checkpoint's
        try:
            module.load_state_dict(seed_sd, strict=True)
        except RuntimeError as exc:
            raise CheckpointError(f"seed tensors of slot {name} do not fit {rec['blueprint']}: {exc}") from exc
        slot.module = module
    restore_json(tr, payload, rollback=rollback)
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
    if "rng" in tensors:
        rng.set_state(tensors["rng"]["torch"])
    return Position(int(payload["epoch"]), int(payload["step_in_epoch"]), int(payload["global_step"]))


def restore_json(tr: Trainer, payload: dict[str, Any], *, rollback: bool) -> None:
    """The non-tensor half of a restore: seed lifecycles and counters, history, controller, emergency."""
    records = {r["slot"]: r for r in payload["seeds"]}
    for name, slot in tr.kasmina.slots.items():
        rec = records[name]
        slot.machine = StrictMachine(SEED, name, observer=slot.machine.observer, initial=rec["stage"],
                                     history=[TransitionRecord(**h) for h in rec["history"]])
        slot.blueprint = rec["blueprint"]
        slot.seed_id = rec["seed_id"]
        slot.germinations = rec["germinations"]
        slot.stats = SeedStats.from_dict(copy.deepcopy(rec["stats"]))
    tr.history = list(payload["history"])
    tr.global_step = int(payload["global_step"])
    tr.restore_partial_stats(payload["epoch_stats"])
    if rollback:
        if tr.controller is not None:
            tr.controller.rewind(int(payload["epoch"]), "rollback to last-known-good")
        return
    tr.emergency.load_state_dict(payload["emergency"])
    if tr.controller is not None and payload.get("controller") is not None:
        tr.controller.load_state_dict(payload["controller"])
    tr.rollbacks = list(payload["rollbacks"])
    tr.commands.clear()
    tr.commands.update(payload["commands"])
