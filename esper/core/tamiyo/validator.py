"""The controller's command validator: structural and lifecycle legality, with a structured result."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from esper.core.config import SeedsConfig
from esper.core.tamiyo.commands import Command
from esper.core.tamiyo.observation import SlotView
from esper.statemachines import SEED


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    reason: str


@dataclass(frozen=True)
class ValidationContext:
    """What a command is validated against: config-derived sets, the run, epoch and ids issued so far, and each
    observed slot's layout (``"channels1d [N, 6, 19]"``) with the blueprints compatible with it."""

    slots: frozenset[str]
    blueprints: frozenset[str]
    known_blueprints: frozenset[str]
    run_id: str
    epoch: int
    issued_ids: Collection[str]
    compatible: Mapping[str, tuple[str, ...]]
    layouts: Mapping[str, str]

    @classmethod
    def build(cls, seeds: SeedsConfig, run_id: str, epoch: int, issued_ids: Collection[str],
              views: Sequence[SlotView]) -> ValidationContext:
        germinable = frozenset(seeds.blueprints)
        return cls(frozenset(s.name for s in seeds.slots), germinable,
                   germinable | frozenset(seeds.user_blueprints), run_id, epoch, issued_ids,
                   {v.name: v.compatible for v in views},
                   {v.name: f"{v.kind} [{', '.join(['N', *map(str, v.shape)])}]" for v in views})


def validate(cmd: Command, stages: Mapping[str, str], ctx: ValidationContext) -> ValidationResult:
    """Check ``cmd`` against the slots' current stages (per the SEED table) and the config."""
    if cmd.run_id != ctx.run_id:
        return ValidationResult(False, f"run id {cmd.run_id!r} is not this run ({ctx.run_id!r})")
    if cmd.epoch != ctx.epoch:
        return ValidationResult(False, f"command epoch {cmd.epoch} is not the current epoch {ctx.epoch}")
    if cmd.command_id in ctx.issued_ids:
        return ValidationResult(False, f"command id {cmd.command_id} was already issued in this run")
    if cmd.slot not in ctx.slots:
        configured = ", ".join(sorted(ctx.slots))
        return ValidationResult(False, f"unknown slot {cmd.slot!r} (configured: {configured})")
    if cmd.slot not in stages:
        return ValidationResult(False, f"slot {cmd.slot!r} has no observed stage")
    if cmd.kind == "germinate":
        if cmd.blueprint not in ctx.blueprints:
            allowed = ", ".join(sorted(ctx.blueprints))
            return ValidationResult(False, f"blueprint {cmd.blueprint!r} is not in seeds.blueprints ({allowed})")
        fits = ctx.compatible.get(cmd.slot, ())
        if cmd.blueprint not in fits:
            return ValidationResult(
                False, f"blueprint {cmd.blueprint!r} does not accept slot {cmd.slot!r} "
                       f"({ctx.layouts.get(cmd.slot, 'layout unknown')}); compatible there: "
                       f"{', '.join(fits) or 'none'}")
    elif cmd.blueprint is not None and cmd.blueprint not in ctx.known_blueprints:
        return ValidationResult(False, f"unknown blueprint {cmd.blueprint!r}")
    stage = stages[cmd.slot]
    dest = SEED.destination(stage, cmd.kind)
    if dest is None:
        legal = ", ".join(SEED.legal_triggers(stage)) or "none"
        return ValidationResult(
            False, f"{cmd.kind} is not allowed for slot {cmd.slot!r} in stage {stage} (legal there: {legal})")
    return ValidationResult(True, f"{cmd.kind}: {stage} -> {dest}")
