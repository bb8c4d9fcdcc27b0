"""Small shared helpers: UTC timestamps and pydantic error wording."""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import ValidationError


def utc_now_iso() -> str:
    """The current UTC time in ISO 8601 with an explicit offset."""
    return datetime.now(UTC).isoformat()


def parse_utc(text: str) -> datetime:
    """Parse an ISO 8601 timestamp that must carry a UTC offset; ValueError otherwise."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None or moment.utcoffset() != UTC.utcoffset(None):
        raise ValueError(f"timestamp {text!r} is not UTC (needs a +00:00 or Z offset)")
    return moment


def describe(exc: ValidationError) -> str:
    """One line per pydantic error, naming the field path."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err.get("loc", ())) or "<root>"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "; ".join(parts)
