"""The API's one timestamp format, and MLBench's (its runs and metrics keep their own)."""

import datetime


def iso(epoch: float | None) -> str | None:
    """RFC 3339, UTC, milliseconds, e.g. ``2026-11-28T00:14:04.047Z``; None for no time."""
    if not epoch:
        return None
    t = datetime.datetime.fromtimestamp(epoch, datetime.UTC)
    return t.isoformat(timespec="milliseconds").replace("+00:00", "Z")


MLBENCH_DATE = "%Y-%m-%dT%H:%M:%S.%fZ"  # mlbench-dashboard's serializers' date format


def mlbench_date(epoch: float | None) -> str | None:
    """``MLBENCH_DATE`` in UTC, e.g. ``2026-12-05T09:16:58.123456Z``; None for no time."""
    if epoch is None:
        return None
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime(MLBENCH_DATE)


def parse_mlbench_date(text: str) -> float:
    """A date as MLBench's clients send one -> epoch seconds; ValueError if it is none.

    mlbench-core sends Python's ``str(datetime)`` (``2026-12-05 09:16:58.123456``: a
    space, no zone, meaning UTC as the dashboard read it); ISO 8601 with ``T`` and ``Z``
    or an offset is taken too."""
    s = text.strip()
    if s[-1:] in ("Z", "z"):
        s = s[:-1] + "+00:00"
    t = datetime.datetime.fromisoformat(s)
    return (t if t.tzinfo else t.replace(tzinfo=datetime.UTC)).timestamp()
