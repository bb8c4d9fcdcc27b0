"""What every config section shares: the strict base model, the trust marks and the plug-in reference form."""

from __future__ import annotations

import re

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
