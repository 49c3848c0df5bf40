"""One JSON record of a tracked operation, for `status --json`, the HTTP API, reports and notices.

The field names are the documented interface (README "Reports", docs/reports.md): add fields,
never rename or remove one. Times are ISO 8601 in UTC with a Z, to the second.

``OperationRecord`` is the one definition of the record: ``operation_record`` fills exactly its
keys, and the OpenAPI document's schema is derived from it (``msgspec.json.schema``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, TypedDict, cast

import msgspec

# A time as the records write it (``utc_text``); "date-time" lets a client parse it as one.
Time = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]


class OperationRecord(TypedDict):
    """A tracked operation: its last known state and how optrack polls it."""

    id: Annotated[str, msgspec.Meta(description="The SenderPool operation ID")]
    # Not an enum: the API may add a status, and a client's enum would refuse it.
    status: Annotated[
        str,
        msgspec.Meta(description="PENDING, PROCESSING, COMPLETED, CANCELED or NOT_FOUND"),
    ]
    total: int | None
    queued: int | None
    created: int | None
    failed: int | None
    remote_created_at: Time | None
    remote_updated_at: Time | None
    tracked_at: Time
    last_polled_at: Time | None
    next_poll_at: Annotated[Time | None, msgspec.Meta(description="None once ended")]
    polls: int
    consecutive_errors: int
    last_error: str | None
    ended_at: Time | None
    account: Annotated[
        str,
        msgspec.Meta(
            description="The account whose credentials poll it (`default`: the environment's)"
        ),
    ]


OPERATION_FIELDS = tuple(OperationRecord.__annotations__)


def utc_text(value: datetime) -> str:
    """An aware datetime as ISO 8601 in UTC with a Z, to the second (as the API writes them)."""
    # Not strftime: its %Y writes the year 1 as "1", not "0001".
    return value.astimezone(UTC).replace(tzinfo=None, microsecond=0).isoformat() + "Z"


def iso(value: datetime | None) -> str | None:
    """``utc_text`` of ``value``, or None."""
    return None if value is None else utc_text(value)


def operation_record(op: object) -> OperationRecord:
    """The operation's documented fields; one it lacks (an ended row's next poll) is None."""
    # Not dataclasses.asdict: it deep-copies, ten times the cost on a page of 1,000 operations.
    record: dict[str, Any] = {}
    for name in OPERATION_FIELDS:
        value = getattr(op, name, None)
        record[name] = iso(value) if isinstance(value, datetime) else value
    return cast(OperationRecord, record)
