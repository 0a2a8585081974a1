"""ISO 8601 date-times as the API and the command line accept them: text only, ``Z`` allowed, naive means UTC."""

from __future__ import annotations

from datetime import datetime

from persistence.records.models import to_utc


def parse_iso8601(value: str) -> datetime:
    """Parse ``value`` (``2026-03-02T08:00:00Z``, ``2026-03-02 08:00+01:00``, ``2026-03-02``) to an aware UTC datetime.

    Raises ``ValueError`` with an example of the expected form.
    """
    text = value.strip()
    try:
        parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 date-time (e.g. 2026-03-02T08:00:00Z)") from None
    return to_utc(parsed)
