"""Bounded parsers for every piece of outside text Esper reads (S-4): config files and ``--set`` values, a
checkpoint's ``config_toml``, runbooks, manifests and JSON Lines records.

Python's own parsers are unbounded in the ways an attacker uses: nesting deep enough to exhaust the recursion
limit (RecursionError), integers long enough to trip the int/str conversion limit (ValueError) or, below it, to
cost quadratic time, and numbers no consumer can hold. Here every parse has a nesting bound and a number bound,
and every failure is a :class:`ParseError` (a ValueError) whose message never quotes the input: callers map it
to their own error (exit 3 for a config or runbook, 4 for a checkpoint, a skipped record for JSONL).
"""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

# Deeper than anything Esper writes (an event's attributes nest ~5 levels; a config 4); far below the recursion
# limit, so the depth check itself never recurses into trouble.
MAX_DEPTH = 64
# Integers are 64-bit on disk (TOML's own range; every JSON file Esper writes): a wider one is refused, not
# truncated or carried into a consumer (torch seeds, C ints) that would fail later.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1
_MAX_INT_CHARS = 21  # "-9223372036854775808" and "18446744073709551615" fit; parsing stays linear
_MAX_FLOAT_CHARS = 400


class ParseError(ValueError):
    """Outside text that is not what it claims to be, or exceeds a bound; the message never quotes it."""


def clip(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters (with a note of how much was cut), for messages about outside input."""
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _int(literal: str) -> int:
    if len(literal) > _MAX_INT_CHARS:
        raise ParseError(f"integer literal of {len(literal)} digits is out of range")
    value = int(literal)
    if not INT_MIN <= value <= INT_MAX:
        raise ParseError("integer out of the 64-bit range")
    return value


def _float(literal: str) -> float:
    if len(literal) > _MAX_FLOAT_CHARS:
        raise ParseError(f"number literal of {len(literal)} characters")
    return float(literal)


def loads_json(data: str | bytes, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON document within the bounds (bytes must be UTF-8)."""
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParseError(f"not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(data, parse_int=_int, parse_float=_float)
    except ParseError:
        raise
    except RecursionError:
        raise ParseError(f"nested deeper than {max_depth} levels") from None
    except json.JSONDecodeError as exc:
        raise ParseError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    check_depth(value, max_depth)
    return value


def loads_toml(text: str, *, max_depth: int = MAX_DEPTH) -> dict[str, Any]:
    """Parse a TOML document within the bounds; a failure names the line (TOML syntax) or the key (bounds)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ParseError(f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise ParseError(f"nested deeper than {max_depth} levels{_toml_where(text, max_depth)}") from None
    except ValueError as exc:  # an integer past the int/str conversion limit
        raise ParseError(f"a number is out of range ({clip(str(exc), 60)})") from None
    check_depth(doc, max_depth)
    return doc


_TOML_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\.\"' ]+?)\s*=")


def _toml_where(text: str, max_depth: int) -> str:
    """Where a TOML document first nests past ``max_depth`` (the parser's own RecursionError says nowhere): the
    line and the key whose value it is. A scan of brackets outside strings, for the message only."""
    depth, quote, key = 0, "", None
    for number, line in enumerate(text.splitlines(), 1):
        if depth == 0 and (m := _TOML_KEY.match(line)):
            key = m.group(1).strip()
        i = 0
        while i < len(line):
            ch = line[i]
            if quote:
                if ch == "\\" and quote == '"':
                    i += 1
                elif ch == quote:
                    quote = ""
            elif ch in "\"'":
                quote = ch
            elif ch == "#":
                break
            elif ch in "[{":
                depth += 1
                if depth > max_depth:
                    return f" at line {number}" + (f" (key {clip(key, 60)!r})" if key else "")
            elif ch in "]}":
                depth = max(depth - 1, 0)
            i += 1
    return ""


def check_depth(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """ParseError when ``value`` nests containers deeper than ``max_depth`` or holds an integer past 64 bits
    (TOML parses any length); iterative, so a deep value cannot exhaust the stack here."""
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, dict | list):
            if depth >= max_depth:
                raise ParseError(f"nested deeper than {max_depth} levels" + (f" at {clip(where, 60)}" if where else ""))
            items = node.items() if isinstance(node, dict) else enumerate(node)
            for k, v in items:
                stack.append((v, depth + 1, f"{where}.{k}" if where else str(k)))
        elif isinstance(node, int) and not isinstance(node, bool) and not INT_MIN <= node <= INT_MAX:
            raise ParseError("integer out of the 64-bit range" + (f" at {clip(where, 60)}" if where else ""))
