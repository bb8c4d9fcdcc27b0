"""Where a config comes from and how it is read: the file (``--config``, ``$ESPER_CONFIG``, ``./esper.toml``, else
the built-in defaults), ``--set`` overrides parsed as TOML, and validation against the schema."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from esper.core.config.messages import describe
from esper.core.config.schema import DEFAULT_PATH, ENV_VAR, EsperConfig
from esper.core.errors import ConfigError
from esper.core.io import bounded
from esper.core.io.tomlfile import parse_toml, read_toml


@dataclass(frozen=True)
class ResolvedConfig:
    config: EsperConfig
    path: Path | None  # None: no file anywhere, the built-in defaults
    overrides: tuple[str, ...]

    @property
    def source(self) -> str:
        """Where the config came from, for people: the file, or the built-in defaults."""
        return str(self.path) if self.path is not None else BUILTIN_SOURCE


BUILTIN_SOURCE = "the built-in defaults (no --config, $ESPER_CONFIG or ./esper.toml)"


def resolve_path(explicit: Path | None, env: Mapping[str, str] | None = None) -> Path:
    """``--config`` beats ``$ESPER_CONFIG`` beats ``./esper.toml``."""
    env = os.environ if env is None else env
    if explicit is not None:
        return explicit
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    return DEFAULT_PATH


def load(
    explicit: Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> ResolvedConfig:
    """Read, override and validate the config; every problem is a ConfigError with a readable message. With no
    file named anywhere and no ./esper.toml, the built-in defaults (a file that was *named* and is missing is
    still an error: never another file in its place)."""
    path = resolve_path(explicit, env)
    if explicit is None and path == DEFAULT_PATH and not os.path.lexists(path):
        return ResolvedConfig(from_dict({}, overrides), None, tuple(overrides))
    raw = read_toml(path, ConfigError,
                    f"config file not found: {path} (tried --config, ${ENV_VAR}, ./esper.toml in that order)")
    for item in overrides:
        apply_override(raw, item)
    return ResolvedConfig(validate(raw, source=str(path)), path, tuple(overrides))


def operator_config(overrides: Sequence[str] = (), env: Mapping[str, str] | None = None) -> EsperConfig:
    """The operator's own config where none was named (a plain ``--resume``): what the normal resolution finds
    (``$ESPER_CONFIG``, else ``./esper.toml``), or the schema's defaults when there is no file; then ``--set``."""
    return load(None, overrides, env).config


def from_dict(raw: Mapping[str, Any], overrides: Sequence[str] = ()) -> EsperConfig:
    """Validate a config given as a dict (tests, resumed checkpoints)."""
    data = json.loads(json.dumps(raw))
    for item in overrides:
        apply_override(data, item)
    return validate(data, source="<dict>")


def from_toml_text(text: str, source: str = "<text>") -> EsperConfig:
    return validate(parse_toml(text, ConfigError, source), source=source)


def validate(raw: Mapping[str, Any], source: str) -> EsperConfig:
    try:
        return EsperConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        lines = [describe(err, EsperConfig) for err in errors[:20]]
        if len(errors) > 20:
            lines.append(f"... and {len(errors) - 20} more")
        key = (".".join(str(p) for p in errors[0].get("loc", ())) or None) if errors else None
        raise ConfigError(f"{source}: invalid config:\n  " + "\n  ".join(lines), key=key) from exc


_BARE = re.compile(r"^[A-Za-z_][\w.:/+-]*$")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=TOML_VALUE``. A bare word that is not TOML is taken as a string (Hydra-style)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    parts = key.split(".")
    if not sep or not key or any(not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise ConfigError(f"malformed --set {bounded.clip(item)!r}: expected dotted.key=TOML_VALUE, "
                          "e.g. trainer.epochs=3")
    text = text.strip()
    try:
        value = bounded.loads_toml(f"v = {text}")["v"]
    except bounded.ParseError as exc:
        if not _BARE.match(text) or text in ("true", "false"):
            raise ConfigError(f"malformed --set {bounded.clip(item)!r}: value of {key} is not TOML ({exc})",
                              key=key) from None
        value = text
    return parts, value


def apply_override(raw: dict[str, Any], item: str) -> None:
    parts, value = parse_override(item)
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"malformed --set {item!r}: {'.'.join(parts[: i + 1])} is not a table")
        node = child
    node[parts[-1]] = value
