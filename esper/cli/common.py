"""Shared CLI plumbing: global options, config loading, output streams and error -> exit code mapping."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich.console import Console

from esper.core import config as config_mod
from esper.core.errors import EsperError, ExitCode
from esper.statemachines import GateRejected, IllegalTransition

P = ParamSpec("P")
R = TypeVar("R")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="Config file (else $ESPER_CONFIG, else ./esper.toml).",
                 show_default=False),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override: dotted.key=TOML_VALUE (repeatable).", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Plain, minimal output for logs and CI.")]


@dataclass
class GlobalOptions:
    config: Path | None = None
    sets: list[str] = field(default_factory=list)
    quiet: bool = False


def global_options(ctx: typer.Context) -> GlobalOptions:
    obj = ctx.find_root().obj
    return obj if isinstance(obj, GlobalOptions) else GlobalOptions()


def load_config(ctx: typer.Context, config: Path | None, sets: list[str] | None) -> config_mod.ResolvedConfig:
    """Resolve the config: a command's own --config/--set win over the global ones."""
    g = global_options(ctx)
    return config_mod.load(config or g.config, [*g.sets, *(sets or [])])


def stdout() -> Console:
    return Console(soft_wrap=True)


def stderr() -> Console:
    return Console(stderr=True, soft_wrap=True)


def print_json(doc: Any) -> None:
    """Write one JSON document to stdout (and nothing else)."""
    sys.stdout.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def fail(message: str, code: ExitCode) -> typer.Exit:
    stderr().print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    return typer.Exit(int(code))


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn typed errors into their exit code and a one-paragraph message on stderr (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except EsperError as exc:
            raise fail(_escape(str(exc)), exc.exit_code) from None
        except (IllegalTransition, GateRejected) as exc:
            raise fail(_escape(str(exc)), ExitCode.ILLEGAL) from None

    return wrapper


def _escape(text: str) -> str:
    return text.replace("[", "\\[")
