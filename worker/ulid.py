"""The creation time an operation ID may carry, as a ULID does.

The reference's IDs look like ULIDs: the first 10 characters of the tail after
``comms_operation_`` (Crockford base32, 50 bits) read as milliseconds since the epoch give
2023-09-05 22:54:57.299 UTC for its example. Nothing in the reference promises it, so this
only reads the time; whether an account's IDs really carry it is proven against the createdAt
its operations showed (``Repository.ids_carry_time``), and nothing depends on the guess.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

PREFIX = "comms_operation_"
CROCKFORD = "0123456789abcdefghjkmnpqrstvwxyz"
TIME_CHARS = 10
# A time before this, or more than AHEAD past now, is not a creation time.
EARLIEST = datetime(2015, 1, 1, tzinfo=UTC)
AHEAD = timedelta(days=1)
# createdAt comes in whole seconds: an ID's time agrees with it within this.
TOLERANCE = timedelta(seconds=2)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_VALUES = {c: i for i, c in enumerate(CROCKFORD)}


def created_from_id(operation_id: str, now: datetime) -> datetime | None:
    """The creation time (UTC, to the millisecond) the ID's first 10 characters give, or None
    if they are not Crockford base32 or the time is not plausible (before 2015, more than a
    day past ``now``)."""
    if not operation_id.startswith(PREFIX):
        return None
    head = operation_id[len(PREFIX) : len(PREFIX) + TIME_CHARS].lower()
    if len(head) < TIME_CHARS:
        return None
    millis = 0
    for char in head:
        value = _VALUES.get(char)
        if value is None:
            return None
        millis = millis * 32 + value
    if millis > (now + AHEAD - EPOCH) // timedelta(milliseconds=1):
        return None
    created = EPOCH + timedelta(milliseconds=millis)
    return created if created >= EARLIEST else None


def agrees(operation_id: str, created_at: datetime, now: datetime) -> bool:
    """True if the ID's time is within ``TOLERANCE`` of the createdAt its operation showed."""
    created = created_from_id(operation_id, now)
    return created is not None and abs(created - created_at) <= TOLERANCE
