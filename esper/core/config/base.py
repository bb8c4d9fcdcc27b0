"""What every config section shares: the strict base model, the trust marks, the plug-in reference form and the
count-or-percentage form of a key resolved against the run."""

from __future__ import annotations

import re
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict

_FACTORY = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# What a key's value means to the code that uses it (S-1): a ``module:function`` Esper imports and calls, or a
# file-system path it writes. ``esper.core.config.trust`` finds every such key from these marks, so a key added later
# is covered by marking it; a checkpoint's config may never supply one the operator's config does not name.
CODE = {"trust": "code"}
PATH = {"trust": "path"}
_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"  # slot and blueprint names: also tensor-key and event-name parts
MAX_TIMEOUT_MS = 3_600_000  # an hour: every budget is finite, and well inside what a thread wait accepts


def is_factory_ref(text: str) -> bool:
    """Whether ``text`` has the ``module:function`` form used for plug-ins."""
    return bool(_FACTORY.match(text))


class _Section(BaseModel):
    # inf/nan would pass one-sided bounds (lr = inf) or none at all, and poison every comparison downstream.
    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True, allow_inf_nan=False)


def count_or_percentage(v: int | str, count: str, percentage: str, fits: Callable[[float], bool],
                        example: str) -> int | str:
    """A key that is a count (>= 1) or a percentage of something the run knows later ("5%"): the value, checked.
    The error names what the key takes; the error's own line shows what was given."""
    if isinstance(v, bool):
        raise ValueError(f"must be {count} or {percentage}, e.g. \"{example}\"")
    if isinstance(v, int):
        if v < 1:
            raise ValueError(f"must be >= 1, got {v}")
        return v
    m = re.fullmatch(r"(\d{1,4}(?:\.\d{1,6})?)%", v.strip())
    if m is None or not fits(float(m.group(1))):
        raise ValueError(f"a relative value is {percentage}, e.g. \"{example}\"")
    return v.strip()


def share(percentage: str) -> float:
    """A percentage checked by :func:`count_or_percentage` as a fraction ("12.5%" -> 0.125)."""
    return float(percentage[:-1]) / 100
