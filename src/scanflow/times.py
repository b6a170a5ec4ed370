"""One way to write a time for people and for `--json`: ISO 8601 UTC to the millisecond with "Z"
("2026-12-06T06:10:00.123Z"). Every layer uses it, so the CLI, the agents' API and the audit trail
print the same instant the same way."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_utc(when: datetime | float | None) -> str | None:
    """`when` (a datetime or a Unix time) as ISO 8601 UTC to the millisecond; None stays None."""
    if when is None:
        return None
    dt = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
