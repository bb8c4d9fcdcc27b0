"""Reading a TOML file (a config, a runbook) with errors that name the file, line and column (S-4)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from esper.core.errors import EsperError
from esper.core.io import bounded, confine

# A config or runbook is a page or two of text; a file past this is not one (and is never read whole).
MAX_TOML_BYTES = 1 << 20


def read_toml(path: Path, error: type[EsperError], missing: str) -> dict[str, Any]:
    """Parse ``path``; a missing or unreadable file, anything but a regular file, bad UTF-8, a TOML syntax error
    or a bound exceeded (size, nesting, number) is ``error`` with a message that never quotes the file."""
    try:
        data = confine.read_bytes(path, MAX_TOML_BYTES, follow=True)  # a file the operator named
    except FileNotFoundError:
        raise error(missing) from None
    except confine.UnsafePath as exc:
        raise error(str(exc)) from None
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return parse_toml(text, error, str(path))


def parse_toml(text: str, error: type[EsperError], source: str) -> dict[str, Any]:
    """Parse TOML text from ``source`` (a file, a checkpoint's config) within the bounds."""
    try:
        return bounded.loads_toml(text)
    except bounded.ParseError as exc:
        raise error(f"{source}: {exc}") from None
