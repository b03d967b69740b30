"""The one RFC 3339 formatter (and parser) of ztagent: always UTC, always ``Z``.

Every time a person, a log line, a policy input or a state file sees is written here, so
none of them can disagree on the zone or the suffix. A naive ``datetime`` is refused: without
a zone it cannot be converted to UTC, only mislabelled.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

FractionDigits = Literal[0, 3, 6]
_TIMESPEC = {0: "seconds", 3: "milliseconds", 6: "microseconds"}


def rfc3339(when: datetime, *, digits: FractionDigits = 0) -> str:
    """``2026-12-01T21:13:54Z`` (``digits`` = 3 or 6 add milliseconds or microseconds),
    converted to UTC first."""
    if when.tzinfo is None:
        raise ValueError(f"got a naive datetime {when!r}, expected a timezone-aware one")
    utc = when if when.tzinfo is UTC else when.astimezone(UTC)
    # isoformat of an aware UTC time ends in "+00:00"; it pads the year to four digits
    # (strftime's %Y does not) and is faster (this runs twice per request)
    return utc.isoformat(timespec=_TIMESPEC[digits])[:-6] + "Z"


def rfc3339_from_timestamp(seconds: float) -> str:
    """A POSIX timestamp as RFC 3339; a value no calendar holds is shown as the number."""
    try:
        return rfc3339(datetime.fromtimestamp(seconds, UTC))
    except (OverflowError, ValueError, OSError):
        return f"{seconds:g}"


def parse_rfc3339(text: str) -> datetime:
    """A UTC time as ``rfc3339`` writes it (any fraction), as an aware ``datetime``."""
    if not text.endswith("Z"):
        raise ValueError(f"got {text!r}, expected an RFC 3339 UTC time ending in 'Z'")
    return datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)
