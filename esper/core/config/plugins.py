"""Loading user plug-ins named as ``module:function`` in the config.

A plug-in is the operator's own code, named by the operator's own config (a checkpoint can never supply one:
``esper.core.config.trust``). Whatever goes wrong with it — the module is missing, fails at import (a SyntaxError, an
exception at its top level), lacks the function, the factory raises or returns the wrong thing — is a
ConfigError (exit 3) naming the config key and the exception, never a crash of Esper.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from esper.core.errors import ConfigError, EsperError
from esper.core.io.bounded import clip


def load_factory(ref: str, key: str) -> Callable[..., Any]:
    """Import ``module:function``; any failure is a ConfigError naming the config key."""
    module_name, _, attr = ref.partition(":")
    if os.getcwd() not in sys.path:
        # like `python -m` (and uvicorn, pytest): a plug-in module beside the config is importable
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the user's module failing to import, however it fails, is a config
        # problem of that key (exit 3), reported with its exception; SystemExit/KeyboardInterrupt pass through
        raise ConfigError(f"{key} = {ref!r}: cannot import module {module_name!r}: {_name(exc)}", key=key) from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"{key} = {ref!r}: module {module_name!r} has no callable {attr!r}", key=key)
    return factory


def call_factory(factory: Callable[..., Any], ref: str, key: str, *args: Any) -> Any:
    """Call a plug-in factory; an exception it raises is a ConfigError naming the key (Esper's own errors, raised
    by the Esper code a factory may call, keep their meaning)."""
    try:
        return factory(*args)
    except EsperError:
        raise
    except Exception as exc:  # noqa: BLE001 - the operator's factory failing is that key's problem (exit 3)
        raise ConfigError(f"{key} = {ref!r}: the factory raised {_name(exc)}", key=key) from exc


def check_type(value: Any, expected: type | tuple[type, ...], ref: str, key: str) -> Any:
    if not isinstance(value, expected):
        names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
        raise ConfigError(f"{key} = {ref!r}: factory returned {type(value).__name__}, expected {names}", key=key)
    return value


def _name(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {clip(str(exc), 300)}"
