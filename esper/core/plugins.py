"""Loading user plug-ins named as ``module:function`` in the config."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from esper.core.errors import ConfigError


def load_factory(ref: str, key: str) -> Callable[..., Any]:
    """Import ``module:function``; any failure is a ConfigError naming the config key."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        # like `python -m` (and uvicorn, pytest): a plug-in module beside the config is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # the user's module, not one of ours: its absence is a config problem
        raise ConfigError(f"{key} = {ref!r}: cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{key} = {ref!r}: module {module_name!r} has no callable {attr!r}")
    return factory


def check_type(value: Any, expected: type | tuple[type, ...], ref: str, key: str) -> Any:
    if not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{key} = {ref!r}: factory returned {type(value).__name__}, expected {names}")
    return value
