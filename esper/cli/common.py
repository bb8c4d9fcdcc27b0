"""Shared CLI plumbing: global options, config loading, output streams and error -> exit code mapping."""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TextIO, TypeVar

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from esper.core import config as config_mod
from esper.core.errors import EsperError, ExitCode
from esper.statemachines import GateRejected, IllegalTransition

P = ParamSpec("P")
R = TypeVar("R")
# Click's exception classes, found through Typer's public BadParameter (Typer vendors Click in newer releases and
# depends on it in older ones; either way these are the classes its parser raises).
_ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

ConfigOpt = Annotated[
    Path | None,
    # readable=False: the loader checks it, so an unreadable --config is exit 3 like one found any other way
    typer.Option("--config", "-c", help="Config file (else $ESPER_CONFIG, else ./esper.toml).",
                 show_default=False, readable=False),
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


class _Process:
    entry = False  # set by the console script: this process ends when the command does (not a test's runner)


def console_script() -> bool:
    """Whether this command runs as the `esper` process itself (what it may do to its signal handling)."""
    return _Process.entry


def mark_console_script() -> None:
    _Process.entry = True


class EsperConsole(Console):
    """Rich's console, with Esper's exit code when the reader goes away: 141 (SIGPIPE's), not 1 (a bug)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        reader_gone()
        raise SystemExit(int(ExitCode.SIGPIPE))


def reader_gone() -> None:
    """stdout's reader went away (``esper runs | head``): what is left unwritten goes to /dev/null, so neither a
    later write nor the interpreter's flush at exit ends in a BrokenPipeError traceback."""
    if sys.stdout is None:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test runner's buffer): nothing to redirect
        return
    finally:
        os.close(devnull)


PIPE_WIDTH = 200  # a table written to a pipe or a file (`esper runs | cat`, a CI log): no terminal to fit


def _width(stream: TextIO | None) -> int | None:
    """Rich's 80 columns squeeze a table into '…' when nobody sees a terminal; COLUMNS still wins."""
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    return None if tty or os.environ.get("COLUMNS") else PIPE_WIDTH


def stdout() -> Console:
    return EsperConsole(soft_wrap=True, width=_width(sys.stdout))


def stderr() -> Console:
    return EsperConsole(stderr=True, soft_wrap=True, width=_width(sys.stderr))


class _Output:
    """Whether this invocation already printed its one JSON document (an error after it must not add a second),
    and where it goes while user code runs with stdout pointed at stderr (:func:`json_stdout`)."""

    json_printed = False
    redirected = False
    stream: TextIO | None = None


def print_json(doc: Any) -> None:
    """Write one JSON document to stdout (and nothing else). A closed stdout (``>&-``) takes nothing: the run's
    outcome is in its run directory and its exit code stays the run's."""
    out = _Output.stream if _Output.redirected else sys.stdout
    _Output.json_printed = True
    if out is None:
        return
    out.write(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    out.flush()


@contextlib.contextmanager
def json_stdout() -> Iterator[None]:
    """Under ``--json``, stdout holds exactly Esper's one document: while the command runs, whatever else writes
    to stdout -- a user's host or dataset calling ``print``, a C library writing to file descriptor 1, a worker
    process inheriting it -- goes to stderr, and :func:`print_json` writes to the real stdout."""
    real = sys.stdout
    try:
        fd = real.fileno() if real is not None else None
    except (AttributeError, OSError, ValueError):  # not a file (a test runner's buffer): swap the object only
        fd = None
    saved = None
    if fd is not None and sys.stderr is not None:
        real.flush()
        saved = os.dup(fd)
        os.dup2(sys.stderr.fileno(), fd)
        _Output.stream = os.fdopen(os.dup(saved), "w", encoding=getattr(real, "encoding", None) or "utf-8")
    else:
        _Output.stream = real
    _Output.redirected = True
    sys.stdout = sys.stderr
    try:
        yield
    finally:
        if sys.stdout is not None:
            sys.stdout.flush()
        sys.stdout = real
        stream, _Output.stream, _Output.redirected = _Output.stream, None, False
        if saved is not None and fd is not None:
            with contextlib.suppress(OSError):  # a reader that went away: the document is lost, not the run
                stream.close()  # type: ignore[union-attr]
            os.dup2(saved, fd)
            os.close(saved)


def report_error(message: str, code: int, key: str | None, *, as_json: bool) -> None:
    """The one way a failure is shown (contracts C4): one line (or paragraph) on stderr with markup off, so text
    in brackets (``[N, C, L]``) is printed as it is; with ``--json`` also one JSON error document on stdout,
    ``{"error", "exit_code", "key"}``, unless the command already printed its document."""
    if as_json and not _Output.json_printed:
        print_json({"error": message, "exit_code": int(code), "key": key})
    stderr().print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)


def fail(message: str, code: ExitCode, key: str | None = None, *, as_json: bool = False) -> typer.Exit:
    report_error(message, code, key, as_json=as_json)
    return typer.Exit(int(code))


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn typed errors into their exit code and a message on stderr (no traceback); with ``--json``, one JSON
    error document on stdout too. Every command goes through here."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        as_json = bool(kwargs.get("as_json"))
        _Output.json_printed = False
        try:
            if not as_json:
                return fn(*args, **kwargs)
            with json_stdout():
                return fn(*args, **kwargs)
        except EsperError as exc:
            raise fail(str(exc), exc.exit_code, exc.key, as_json=as_json) from None
        except (IllegalTransition, GateRejected) as exc:
            raise fail(str(exc), ExitCode.ILLEGAL, as_json=as_json) from None

    return wrapper


class EsperGroup(TyperGroup):
    """The root command group: usage errors Click finds before a command runs (a bad option value, a missing
    argument) and bugs go through the same error path, so ``--json`` gets its error document there too."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:  # before Click's own handler, which exits 1 (a bug, in Esper's codes)
            reader_gone()
            raise SystemExit(int(ExitCode.SIGPIPE)) from None

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        as_json = _wants_json(argv[: argv.index("--")] if "--" in argv else argv)
        _Output.json_printed = False
        try:
            rv = super().main(args=argv, prog_name=prog_name, complete_var=complete_var, standalone_mode=False,
                              **extra)
        except _ClickException as exc:
            code = int(getattr(exc, "exit_code", ExitCode.USAGE))
            if type(exc).__name__ == "NoArgsIsHelpError":  # `esper` alone (or a group alone): its help
                exc.show()  # type: ignore[attr-defined]
            else:
                report_error(_usage_text(exc), code, _usage_key(exc), as_json=as_json)
            sys.exit(code)
        except typer.Abort:
            report_error("aborted", ExitCode.SIGINT, None, as_json=as_json)
            sys.exit(int(ExitCode.SIGINT))
        except Exception as exc:  # a bug: the document says so, then the traceback is shown as it is
            if as_json and not _Output.json_printed:
                print_json({"error": f"internal error (a bug): {type(exc).__name__}: {exc}",
                            "exit_code": int(ExitCode.INTERNAL), "key": None})
            raise
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def _wants_json(argv: Sequence[str]) -> bool:
    """``--json``, or ``--format json`` (`esper lifecycle`): an error then is a JSON document on stdout too."""
    return "--json" in argv or "--format=json" in argv or any(a in ("--format", "-f") and b == "json"
                                                               for a, b in itertools.pairwise(argv))


def _usage_text(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    hint = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
    return str(exc.format_message()) + hint  # type: ignore[attr-defined]


def _usage_key(exc: Exception) -> str | None:
    param = getattr(exc, "param", None)
    if param is not None and getattr(param, "opts", None):
        return str(param.opts[0])
    return None
