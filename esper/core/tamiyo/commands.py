"""Lifecycle commands the controller issues. Ids are derived from the run-wide sequence, never invented."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from esper.core.tamiyo._util import describe, parse_utc
from esper.core.tamiyo.errors import TamiyoError

CommandKind = Literal["germinate", "cull", "fossilize"]
KINDS: tuple[str, ...] = ("germinate", "cull", "fossilize")
_ID = re.compile(r"^cmd-\d{4,}-\d{3,}$")


def command_id(epoch: int, seq: int) -> str:
    """Id of the ``seq``-th command of a run, issued at ``epoch``: unique because ``seq`` never repeats."""
    if epoch < 0 or seq < 0:
        raise TamiyoError(f"command id needs epoch >= 0 and seq >= 0, got epoch={epoch} seq={seq}")
    return f"cmd-{epoch:04d}-{seq:03d}"


class Command(BaseModel):
    """One lifecycle command for one slot. ``reason`` is for people, ``reason_code`` for machines."""

    model_config = ConfigDict(frozen=True, strict=True, extra="forbid")

    command_id: str
    run_id: str = Field(min_length=1)
    epoch: int = Field(ge=0)
    kind: CommandKind
    slot: str = Field(min_length=1)
    blueprint: str | None
    reason: str = Field(min_length=1)
    reason_code: str = Field(min_length=1)
    issued_at: str

    @field_validator("command_id")
    @classmethod
    def _id(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError(f"command id {v!r} is not of the form cmd-EPOCH-SEQ")
        return v

    @field_validator("issued_at")
    @classmethod
    def _utc(cls, v: str) -> str:
        parse_utc(v)
        return v

    @model_validator(mode="after")
    def _blueprint(self) -> Command:
        if self.kind == "germinate" and not self.blueprint:
            raise ValueError("a germinate command needs a blueprint")
        if not self.command_id.startswith(f"cmd-{self.epoch:04d}-"):
            raise ValueError(f"command id {self.command_id!r} does not carry epoch {self.epoch}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: Any) -> Command:
        """Validate a command read back from JSON; TamiyoError names every bad field."""
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise TamiyoError(f"invalid command: {describe(exc)}") from exc
