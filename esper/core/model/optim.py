"""Optimizer construction, rebuild with state carry-over, and the LR schedule (SPEC T-8).

Every param group is named (``"host"``, ``"seed:s1"``) and carries ``base_lr``; the schedule sets
``lr = base_lr * factor(step)`` where ``step`` is the global optimizer step, so it is a pure function of
that step and a resumed run gets exactly the same learning rates. The schedule holds no reference to any
optimizer (unlike ``torch.optim.lr_scheduler``), so rebuilding the optimizer leaves nothing stale behind.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from esper.core.config import TrainerConfig
from esper.core.errors import EsperError

__all__ = [
    "LRSchedule",
    "OptimizerError",
    "ParamGroupSpec",
    "RebuildReport",
    "build_optimizer",
    "rebuild_optimizer",
]

_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adamw": torch.optim.AdamW,
}
_POLICIES = ("constant", "cosine", "step", "linear", "inverse_sqrt", "polynomial", "onecycle")
_PAST_T_MAX = ("floor", "restart")
# Scalar per-parameter counters; every other tensor in a parameter's state is shaped like the parameter.
_SCALAR_STATE_KEYS = frozenset({"step"})


class OptimizerError(EsperError):
    """An optimizer could not be built or rebuilt, its state could not be carried, or the LR is undefined."""


@dataclass(frozen=True)
class ParamGroupSpec:
    """One named param group. ``lr``/``weight_decay`` of ``None`` take the ``TrainerConfig`` value.

    The overrides apply when the group is created; a group that already exists keeps its settings on rebuild.
    """

    name: str
    params: list[torch.nn.Parameter]
    lr: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True)
class RebuildReport:
    """What a rebuild did, for telemetry and the rebuild breaker."""

    added_groups: tuple[str, ...]
    removed_groups: tuple[str, ...]
    kept_groups: tuple[str, ...]
    carried_states: int  # parameters whose state moved into the new optimizer
    dropped_states: int  # parameters with state that are no longer optimized
    fresh_params: int  # parameters that start without state (new, or never stepped)
    moved_params: int  # parameters that changed group (their state is carried)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (lists, ints)."""
        return {
            "added_groups": list(self.added_groups),
            "removed_groups": list(self.removed_groups),
            "kept_groups": list(self.kept_groups),
            "carried_states": self.carried_states,
            "dropped_states": self.dropped_states,
            "fresh_params": self.fresh_params,
            "moved_params": self.moved_params,
        }


def _optimizer_class(cfg: TrainerConfig) -> type[torch.optim.Optimizer]:
    cls = _OPTIMIZERS.get(cfg.optimizer)
    if cls is None:
        raise OptimizerError(f"unknown optimizer {cfg.optimizer!r}; expected one of {sorted(_OPTIMIZERS)}")
    return cls


def _defaults(cfg: TrainerConfig) -> dict[str, Any]:
    if cfg.optimizer == "sgd":
        return {"lr": cfg.lr, "momentum": cfg.momentum, "weight_decay": cfg.weight_decay}
    return {"lr": cfg.lr, "weight_decay": cfg.weight_decay, "betas": tuple(cfg.betas)}


def _validate_specs(groups: Sequence[ParamGroupSpec]) -> None:
    """Names unique and non-empty, every group non-empty, every parameter a leaf in exactly one group."""
    if not groups:
        raise OptimizerError("an optimizer needs at least one param group")
    names: set[str] = set()
    owner: dict[int, str] = {}
    for spec in groups:
        if not isinstance(spec.name, str) or not spec.name:
            raise OptimizerError(f"param group name must be a non-empty string, got {spec.name!r}")
        if spec.name in names:
            raise OptimizerError(f"duplicate param group name {spec.name!r}")
        names.add(spec.name)
        if not spec.params:
            raise OptimizerError(f"param group {spec.name!r} has no parameters")
        for lr_field, value, lower_ok in (("lr", spec.lr, False), ("weight_decay", spec.weight_decay, True)):
            if value is not None and not (math.isfinite(value) and (value > 0 or (lower_ok and value == 0))):
                raise OptimizerError(f"param group {spec.name!r}: invalid {lr_field} {value!r}")
        for i, p in enumerate(spec.params):
            if not isinstance(p, torch.Tensor) or not p.is_leaf:
                raise OptimizerError(f"param group {spec.name!r}: item {i} is not a leaf tensor")
            prev = owner.get(id(p))
            if prev is not None:
                where = f"twice in {prev!r}" if prev == spec.name else f"in {prev!r} and {spec.name!r}"
                raise OptimizerError(f"parameter {i} of group {spec.name!r} appears {where}")
            owner[id(p)] = spec.name


def _fresh_group(cfg: TrainerConfig, spec: ParamGroupSpec) -> dict[str, Any]:
    lr = cfg.lr if spec.lr is None else spec.lr
    wd = cfg.weight_decay if spec.weight_decay is None else spec.weight_decay
    return {"params": list(spec.params), "name": spec.name, "base_lr": lr, "lr": lr, "weight_decay": wd}


def build_optimizer(cfg: TrainerConfig, groups: Sequence[ParamGroupSpec]) -> torch.optim.Optimizer:
    """A fresh optimizer with one named param group per spec; each group carries ``name`` and ``base_lr``."""
    _validate_specs(groups)
    cls = _optimizer_class(cfg)
    return cls([_fresh_group(cfg, spec) for spec in groups], **_defaults(cfg))


def _check_state(state: dict[str, Any], p: torch.Tensor, where: str) -> None:
    """Refuse state that the new optimizer could not use for ``p`` (wrong shape/device/dtype, bad step)."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if key in _SCALAR_STATE_KEYS:
            if value.numel() != 1 or not math.isfinite(float(value)) or float(value) < 0:
                raise OptimizerError(f"cannot carry state {key!r} of {where}: invalid counter {value!r}")
            continue
        if value.shape != p.shape or value.device != p.device or value.dtype != p.dtype:
            raise OptimizerError(
                f"cannot carry state {key!r} of {where}: state is {tuple(value.shape)} {value.dtype} on "
                f"{value.device}, parameter is {tuple(p.shape)} {p.dtype} on {p.device}"
            )


def _copy_state(state: dict[str, Any]) -> dict[str, Any]:
    # Copies, not shared tensors: the old optimizer must not be able to mutate the new one's state.
    return {
        k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()
    }


def rebuild_optimizer(
    old: torch.optim.Optimizer, cfg: TrainerConfig, groups: Sequence[ParamGroupSpec]
) -> tuple[torch.optim.Optimizer, RebuildReport]:
    """A new optimizer over ``groups`` that keeps what ``old`` learned.

    Groups whose name existed keep every hyperparameter of the old group; new groups get ``cfg`` defaults
    (and the spec's overrides). Per-parameter state is carried, by parameter identity, for every parameter
    still optimized (also when it moved group) and dropped for the rest. Any state that cannot be carried
    raises :class:`OptimizerError`; ``old`` is left untouched so the caller can keep using it or roll back.
    Hooks registered on ``old`` are not carried. Call :meth:`LRSchedule.apply` before the next step.
    """
    _validate_specs(groups)
    cls = _optimizer_class(cfg)
    if type(old) is not cls:
        raise OptimizerError(
            f"cannot carry state from {type(old).__name__} to {cls.__name__} "
            f"(trainer.optimizer={cfg.optimizer!r})"
        )
    old_groups: dict[str, dict[str, Any]] = {}
    old_owner: dict[int, str] = {}
    for i, group in enumerate(old.param_groups):
        name = group.get("name")
        if not isinstance(name, str) or name in old_groups:
            raise OptimizerError(f"old optimizer's param group {i} has a missing or duplicate name {name!r}")
        old_groups[name] = group
        for p in group["params"]:
            old_owner[id(p)] = name

    new_groups: list[dict[str, Any]] = []
    carried: list[tuple[torch.Tensor, dict[str, Any]]] = []
    new_ids: set[int] = set()
    fresh = moved = 0
    for spec in groups:
        prior = old_groups.get(spec.name)
        if prior is None:
            group = _fresh_group(cfg, spec)
        else:
            group = {k: copy.deepcopy(v) for k, v in prior.items() if k != "params"}
            group["params"] = list(spec.params)
        new_groups.append(group)
        for i, p in enumerate(spec.params):
            new_ids.add(id(p))
            source = old_owner.get(id(p))
            if source is not None and source != spec.name:
                moved += 1
            # .get, not [], because old.state is a defaultdict and indexing would add an entry to it.
            state = old.state.get(p)
            if not state:
                fresh += 1
                continue
            _check_state(state, p, f"parameter {i} of group {spec.name!r}")
            carried.append((p, _copy_state(state)))

    new = cls(new_groups, **_defaults(cfg))
    for p, state in carried:
        new.state[p] = state
    dropped = sum(1 for p, state in old.state.items() if state and id(p) not in new_ids)
    names = [spec.name for spec in groups]
    report = RebuildReport(
        added_groups=tuple(n for n in names if n not in old_groups),
        removed_groups=tuple(n for n in old_groups if n not in set(names)),
        kept_groups=tuple(n for n in names if n in old_groups),
        carried_states=len(carried),
        dropped_states=dropped,
        fresh_params=fresh,
        moved_params=moved,
    )
    return new, report


def _anneal(start: float, end: float, pct: float) -> float:
    """Cosine from ``start`` (pct 0) to ``end`` (pct 1), as torch's OneCycleLR anneals."""
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1.0)


class LRSchedule:
    """LR factor as a pure function of the global optimizer step (0-based): warm-up, then the policy.

    Warm-up is linear from ``warmup_start_factor`` at step 0 to 1.0 at ``warmup_steps``. After it:
    ``constant`` is 1; ``step`` is ``step_gamma ** ((step - warmup) // step_size)``; ``cosine`` anneals
    from 1 to ``min_lr / lr`` over ``t_max`` steps and then stays at that floor (``floor``) or starts a new
    cycle at 1 (``restart``, as SGDR: the step at ``t_max`` is the first of the next cycle); ``linear`` falls
    from 1 to ``min_lr / lr`` over the rest of the run (the Hugging Face Trainer's default); ``inverse_sqrt`` is
    ``sqrt(W / (W + t))`` with ``W = max(warmup_steps, 1)``, ``t`` the steps since the warm-up (the Transformer's
    schedule, 1 where the warm-up ends); ``polynomial`` is ``floor + (1 - floor) * (1 - t / T) ** poly_power`` over
    the rest of the run (torch's PolynomialLR with a floor); ``onecycle`` is torch's OneCycleLR (cosine, two phases):
    from ``1 / onecycle_div_factor`` up to 1 over ``onecycle_pct_start`` of the run, then down to ``min_lr / lr``
    at its last step.
    """

    def __init__(self, cfg: TrainerConfig, total_steps: int) -> None:
        if cfg.lr_policy not in _POLICIES:
            raise OptimizerError(f"unknown LR policy {cfg.lr_policy!r}; expected one of {list(_POLICIES)}")
        if cfg.lr_policy == "cosine" and cfg.cosine_past_t_max not in _PAST_T_MAX:
            raise OptimizerError(
                f"unknown cosine_past_t_max {cfg.cosine_past_t_max!r}; expected one of {list(_PAST_T_MAX)}"
            )
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 0:
            raise OptimizerError(f"total_steps must be a non-negative int, got {total_steps!r}")
        # The schema checks these, but a model_construct'ed config skips the schema and the factor must stay
        # finite and within [0, 1].
        if not (math.isfinite(cfg.lr) and cfg.lr > 0):
            raise OptimizerError(f"lr must be finite and > 0, got {cfg.lr!r}")
        if not 0 < cfg.warmup_start_factor <= 1:
            raise OptimizerError(f"warmup_start_factor must be in (0, 1], got {cfg.warmup_start_factor!r}")
        if cfg.warmup_steps < 0:
            raise OptimizerError(f"warmup_steps must be >= 0, got {cfg.warmup_steps!r}")
        self.policy: str = cfg.lr_policy
        self.past_t_max: str = cfg.cosine_past_t_max
        self.warmup_steps: int = cfg.warmup_steps
        self.start_factor: float = cfg.warmup_start_factor
        self.step_size: int = cfg.step_size
        self.step_gamma: float = cfg.step_gamma
        self.floor: float = 0.0
        self.t_max: int = 0
        if self.policy == "step" and not (cfg.step_size >= 1 and 0 < cfg.step_gamma <= 1):
            raise OptimizerError(f"step policy needs step_size >= 1 and step_gamma in (0, 1], got "
                                 f"{cfg.step_size!r}, {cfg.step_gamma!r}")
        self.power: float = cfg.poly_power
        self.rise: float = 0.0  # onecycle: the last step of the rise (OneCycleLR's phase end)
        self.start: float = 1.0 / cfg.onecycle_div_factor
        if self.policy in ("linear", "polynomial", "onecycle"):
            if not 0 <= cfg.min_lr <= cfg.lr:
                raise OptimizerError(f"min_lr {cfg.min_lr!r} must be within [0, lr={cfg.lr!r}]")
            self.floor = cfg.min_lr / cfg.lr
            self.t_max = max(total_steps - cfg.warmup_steps, 1)
        if self.policy == "onecycle":
            if cfg.warmup_steps:
                raise OptimizerError("lr_policy 'onecycle' rises by itself: warmup_steps must be 0")
            self.rise = float(cfg.onecycle_pct_start * self.t_max) - 1.0
            if not 0 < self.rise < self.t_max - 1:
                raise OptimizerError(f"onecycle needs a rise and a fall: {self.t_max} steps at onecycle_pct_start "
                                     f"{cfg.onecycle_pct_start} leave none; train longer or change it")
        if self.policy == "cosine":
            if not 0 <= cfg.min_lr <= cfg.lr:
                raise OptimizerError(f"min_lr {cfg.min_lr!r} must be within [0, lr={cfg.lr!r}]")
            self.floor = cfg.min_lr / cfg.lr
            self.t_max = cfg.cosine_t_max or total_steps - cfg.warmup_steps
            if self.t_max <= 0:
                raise OptimizerError(
                    f"cosine period is {self.t_max} steps (total_steps={total_steps}, warmup_steps="
                    f"{cfg.warmup_steps}, cosine_t_max={cfg.cosine_t_max}); set trainer.cosine_t_max > 0"
                )

    # Stateful, with nothing to save: the LR is a pure function of the global step, which TrainState holds.
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise OptimizerError(f"the LR schedule keeps no state, got {sorted(state)}")

    def factor(self, step: int) -> float:
        """The multiplier of ``base_lr`` at global optimizer step ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise OptimizerError(f"step must be a non-negative int (global optimizer step), got {step!r}")
        if step < self.warmup_steps:
            return self.start_factor + (1.0 - self.start_factor) * step / self.warmup_steps
        t = step - self.warmup_steps
        if self.policy == "constant":
            return 1.0
        if self.policy == "step":
            return self.step_gamma ** (t // self.step_size)
        if self.policy == "linear":
            return self.floor + (1.0 - self.floor) * max(0.0, 1.0 - t / self.t_max)
        if self.policy == "inverse_sqrt":
            w = max(self.warmup_steps, 1)
            return math.sqrt(w / (w + t))
        if self.policy == "polynomial":
            return self.floor + (1.0 - self.floor) * (1.0 - min(t, self.t_max) / self.t_max) ** self.power
        if self.policy == "onecycle":
            if t <= self.rise:
                return _anneal(self.start, 1.0, t / self.rise)
            return _anneal(1.0, self.floor, min((t - self.rise) / (self.t_max - 1 - self.rise), 1.0))
        if t >= self.t_max:
            if self.past_t_max == "floor":
                return self.floor
            t %= self.t_max
        value = self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t / self.t_max))
        # Clamp only against float rounding, which can push the sum an ulp outside [floor, 1].
        return min(1.0, max(self.floor, value))

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` to ``base_lr * factor(step)``; returns the factor.

        Every group is checked before any is changed, so a bad group leaves the optimizer untouched.
        """
        for i, group in enumerate(optimizer.param_groups):
            name = group.get("name", f"#{i}")
            for key in ("base_lr", "lr"):
                if key not in group:
                    raise OptimizerError(f"param group {name!r} has no {key!r}")
            base = group["base_lr"]
            numeric = isinstance(base, int | float) and not isinstance(base, bool)
            if not numeric or not math.isfinite(base) or base <= 0:
                raise OptimizerError(f"param group {name!r} has invalid base_lr {base!r}")
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * f
        return f

