"""One JSON record of a tracked operation, for `status --json`, the HTTP API, reports and notices.

The field names are the documented interface (README "Reports", docs/reports.md): add fields,
never rename or remove one. Times are ISO 8601 in UTC with a Z, to the second.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

OPERATION_FIELDS = (
    "id",
    "status",
    "total",
    "queued",
    "created",
    "failed",
    "remote_created_at",
    "remote_updated_at",
    "tracked_at",
    "last_polled_at",
    "next_poll_at",
    "polls",
    "consecutive_errors",
    "last_error",
    "ended_at",
)


def utc_text(value: datetime) -> str:
    """An aware datetime as ISO 8601 in UTC with a Z, to the second (as the API writes them)."""
    # Not strftime: its %Y writes the year 1 as "1", not "0001".
    return value.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def iso(value: datetime | None) -> str | None:
    """``utc_text`` of ``value``, or None."""
    return None if value is None else utc_text(value)


def operation_record(op: object) -> dict[str, Any]:
    """The operation's documented fields; one it lacks (an ended row's next poll) is None."""
    # Not dataclasses.asdict: it deep-copies, ten times the cost on a page of 1,000 operations.
    record: dict[str, Any] = {}
    for name in OPERATION_FIELDS:
        value = getattr(op, name, None)
        record[name] = iso(value) if isinstance(value, datetime) else value
    return record
