"""Readable config validation errors: pydantic's error records as ``key: message (got value)`` lines, with a
did-you-mean hint for unknown keys. What a hostile file put in a value is clipped, never echoed whole."""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, get_args, get_origin

from pydantic import BaseModel

from esper.core.io import bounded


def describe(err: Mapping[str, Any], root: type[BaseModel]) -> str:
    loc = [str(p) for p in err.get("loc", ())]
    path = ".".join(loc) or "<root>"
    if err.get("type") == "extra_forbidden":
        options = _fields_at(root, err.get("loc", ())[:-1])
        close = difflib.get_close_matches(loc[-1], options, n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join([*loc[:-1], close[0]])!r}?" if close else ""
        where = ".".join(loc[:-1]) or "top level"
        return f"{path}: unknown key (allowed in {where}: {', '.join(sorted(options))}){hint}"
    msg = str(err.get("msg", "invalid"))
    msg = msg.removeprefix("Value error, ")
    got = err.get("input")
    if err.get("type") == "missing":
        return f"{path}: required key is missing"
    if isinstance(got, Mapping):  # a section-level check: echoing the whole section buries the message
        return f"{path}: {msg}"
    return f"{path}: {bounded.clip(msg, 200)} (got {bounded.clip(repr(got))})"


def _fields_at(root: type[BaseModel], loc: Sequence[Any]) -> list[str]:
    model: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        fields = ({f.alias or n: f for n, f in model.model_fields.items()}
                  if isinstance(model, type) and issubclass(model, BaseModel) else {})
        field = fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        if get_origin(ann) in (list, dict):
            ann = get_args(ann)[-1]
        model = ann
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [f.alias or n for n, f in model.model_fields.items()]
    return []
