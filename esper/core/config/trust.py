"""A checkpoint names no code (S-1): which config keys are code references or paths, and the rule a resume
applies to them.

A checkpoint's ``config_toml`` is outside input: anyone can edit a manifest and recompute its digest. Two kinds of
keys would let that text act outside the run: **code references** (every ``module:function`` Esper imports and
calls: ``data.task``, ``host.factory``, ``controller.policy``, ``seeds.user_blueprints.*``) and **paths** Esper
writes (``run.output_dir``, ``trainer.profiler.dir``). The schema marks them (``CODE``/``PATH`` in
``esper.core.config``); :func:`references` finds them by those marks, so a key added later is covered when it
is marked, and any other string shaped like ``module:function`` is treated as code too.

The rule: the config a resumed run uses may hold a reference only when **the operator's own config** holds the
same one under the same key. "The operator's own config" is what the operator's normal resolution gives, never the
checkpoint: ``--config`` if given, else ``$ESPER_CONFIG``, else ``./esper.toml`` if it exists, else the schema's
defaults, then every ``--set``. A reference the operator does not name is refused (exit 4, naming the key)
before anything is imported, called or written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from esper.core.config import EsperConfig, is_factory_ref
from esper.core.errors import CheckpointError

Kind = Literal["code", "path"]


@dataclass(frozen=True)
class Reference:
    """A config value that runs code or names a path, under its dotted key."""

    key: str
    kind: Kind
    value: str

    def to_dict(self) -> dict[str, str]:
        return {"key": self.key, "kind": self.kind, "value": self.value}


def references(cfg: BaseModel) -> list[Reference]:
    """Every code reference and path of ``cfg``, in schema order. A code-marked key holding a built-in name
    (``mlp``, ``digits``) runs no outside code and is not a reference; a path-marked key is one when non-empty."""
    found: list[Reference] = []
    _walk(cfg, "", None, found)
    return found


def _walk(value: Any, key: str, mark: Kind | None, found: list[Reference]) -> None:
    if isinstance(value, BaseModel):
        for name, field in type(value).model_fields.items():
            extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
            sub_mark = extra.get("trust")
            _walk(getattr(value, name), f"{key}.{name}" if key else name,
                  sub_mark if sub_mark in ("code", "path") else None, found)  # type: ignore[arg-type]
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(v, f"{key}.{k}", mark, found)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _walk(v, f"{key}.{i}", mark, found)
    elif isinstance(value, str):
        if mark == "path" and value:
            found.append(Reference(key, "path", value))
        elif is_factory_ref(value):  # marked code, or shaped like code under a key nobody marked: code
            found.append(Reference(key, "code", value))


def unnamed(used: EsperConfig, operator: EsperConfig) -> list[Reference]:
    """The references of ``used`` that ``operator`` does not hold under the same key with the same value."""
    own = set(references(operator))
    return [r for r in references(used) if r not in own]


def check_resume(used: EsperConfig, operator: EsperConfig, source: str) -> None:
    """CheckpointError (exit 4) naming every code reference or path that the checkpoint's config would bring in
    and the operator's own config does not name."""
    bad = unnamed(used, operator)
    if not bad:
        return
    listed = "; ".join(f"{r.key} = {r.value!r} ({'code' if r.kind == 'code' else 'a path'})" for r in bad)
    raise CheckpointError(
        f"resume refused: the config in {source} names {listed}, which your own config does not. A resume never "
        f"imports code or uses a path that only a checkpoint names: put the same value in your config (or "
        f"--set {bad[0].key}=...) if you trust it", key=bad[0].key)
