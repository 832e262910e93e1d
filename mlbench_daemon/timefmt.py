"""The API's one timestamp format."""

import datetime


def iso(epoch: float | None) -> str | None:
    """RFC 3339, UTC, milliseconds, e.g. ``2026-11-28T00:14:04.047Z``; None for no time."""
    if not epoch:
        return None
    t = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")
