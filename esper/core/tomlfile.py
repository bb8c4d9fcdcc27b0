"""Reading a TOML file with errors that name the file, line and column."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from esper.core.errors import EsperError


def read_toml(path: Path, error: type[EsperError], missing: str) -> dict[str, Any]:
    """Parse ``path``; a missing file, bad UTF-8 or a TOML syntax error is ``error`` with a readable message."""
    if not path.is_file():
        raise error(missing)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: TOML syntax error: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text: {exc}") from exc
