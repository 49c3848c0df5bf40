"""What the API says about an operation: IDs, statuses, stats, and the parser for its JSON.

JSON from the API is validated here, once, into frozen objects; nothing deeper sees raw dicts.
Unknown extra fields are ignored (the real service may add some); everything documented is
required and checked.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Annotated, Any
from urllib.parse import parse_qs, urlsplit

import msgspec

from worker.errors import InvalidOperationId, SchemaError
from worker.http_date import parse_http_date
from worker.records import utc_text

ID_PREFIX = "comms_operation_"
# The reference's pattern has no `$`; we accept only the whole string (fullmatch) and ASCII.
ID_PATTERN = re.compile(r"comms_operation_[0-7][a-hjkmnpqrstv-z0-9]{25,34}", re.ASCII)
MAX_ID_LENGTH = len(ID_PREFIX) + 35
MAX_COUNT = 2**31 - 1  # the database's integer
MIN_YEAR, MAX_YEAR = 2000, 2999


class Status(enum.StrEnum):
    """The operation's status as the API reports it."""

    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    CANCELED = "CANCELED"


def validate_operation_id(value: object) -> str:
    """Return ``value`` if it is a whole, valid operation ID; raise InvalidOperationId if not."""
    if not isinstance(value, str):
        raise InvalidOperationId(repr(value), "expected a string")
    if not value:
        raise InvalidOperationId(value, "it is empty")
    if len(value) > MAX_ID_LENGTH:
        raise InvalidOperationId(value[:60], f"longer than {MAX_ID_LENGTH} characters")
    if not value.startswith(ID_PREFIX):
        raise InvalidOperationId(value, f"it must start with {ID_PREFIX!r}")
    if ID_PATTERN.fullmatch(value) is None:
        raise InvalidOperationId(
            value,
            "after the prefix expect a digit 0-7 then 25-34 lower-case Crockford base32 "
            "characters (0-9, a-z without i, l, o, u)",
        )
    return value


@dataclass(frozen=True, slots=True)
class Stats:
    """Sender counts of an operation."""

    total: int
    queued: int
    created: int
    failed: int


@dataclass(frozen=True, slots=True)
class Operation:
    """One SenderPoolOperation as fetched from the API."""

    id: str
    status: Status
    stats: Stats
    created_at: datetime
    updated_at: datetime
    # The answer's `Date` header (aware UTC; None if absent or unusable): when the API says it
    # served this, to judge an updatedAt that runs ahead. Not part of what the API says about it.
    served_at: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class Page:
    """One page of the List endpoint."""

    operations: tuple[Operation, ...]
    next_token: str | None
    next_url: str | None
    # Items that broke the schema, as messages: skipped, so one bad item (perhaps of an
    # operation nobody tracks) does not fail the page; a tracked one falls back to a GET.
    rejected: tuple[str, ...] = ()
    served_at: datetime | None = field(default=None, compare=False)  # as on Operation


def parse_datetime(value: object, field: str) -> datetime:
    """Parse an ISO 8601 date-time with an explicit offset into an aware UTC datetime."""
    if not isinstance(value, str):
        raise SchemaError(f"{field}: expected an ISO 8601 string, got {type(value).__name__}")
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise SchemaError(f"{field}: {value[:40]!r} is not an ISO 8601 date-time") from None
    if parsed.tzinfo is None:
        raise SchemaError(f"{field}: {value[:40]!r} has no time zone")
    try:
        parsed = parsed.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00 is before year 1 in UTC
        raise SchemaError(f"{field}: {value[:40]!r} is out of range") from None
    # Far-off years are not real operations, and break date arithmetic (List windows) later.
    if not MIN_YEAR <= parsed.year <= MAX_YEAR:
        raise SchemaError(f"{field}: {value[:40]!r} is outside {MIN_YEAR}..{MAX_YEAR}")
    return parsed


def _count(stats: dict[str, Any], name: str) -> int:
    value = stats.get(name)
    # bool is an int in Python; the schema says integer, so reject it explicitly.
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"stats.{name}: expected an integer, got {value!r}"[:120])
    if not 0 <= value <= MAX_COUNT:
        raise SchemaError(f"stats.{name}: must be 0..{MAX_COUNT}, got {value}"[:120])
    return value


def parse_operation(
    data: object, expected_id: str | None = None, served_at: datetime | None = None
) -> Operation:
    """Validate one SenderPoolOperation object; raise SchemaError on any breach."""
    if not isinstance(data, dict):
        raise SchemaError(f"operation: expected an object, got {type(data).__name__}")
    try:
        op_id = validate_operation_id(data.get("id"))
    except InvalidOperationId as exc:
        raise SchemaError(f"id: {exc.reason}") from None
    if expected_id is not None and op_id != expected_id:
        raise SchemaError(f"id: asked for {expected_id}, the answer is about {op_id}")
    raw_status = data.get("status")
    try:
        status = Status(str(raw_status))
    except ValueError:
        raise SchemaError(f"status: unknown value {raw_status!r}"[:120]) from None
    stats = data.get("stats")
    if not isinstance(stats, dict):
        raise SchemaError("stats: expected an object")
    return Operation(
        id=op_id,
        status=status,
        stats=Stats(
            total=_count(stats, "total"),
            queued=_count(stats, "queued"),
            created=_count(stats, "created"),
            failed=_count(stats, "failed"),
        ),
        created_at=parse_datetime(data.get("createdAt"), "createdAt"),
        updated_at=parse_datetime(data.get("updatedAt"), "updatedAt"),
        served_at=served_at,
    )


def parse_page(data: object, served_at: datetime | None = None) -> Page:
    """Validate a List answer: ``operations`` and ``pagination`` are required."""
    if not isinstance(data, dict):
        raise SchemaError(f"page: expected an object, got {type(data).__name__}")
    operations = data.get("operations")
    pagination = data.get("pagination")
    if not isinstance(operations, list):
        raise SchemaError("operations: expected a list")
    if not isinstance(pagination, dict) or "next" not in pagination:
        raise SchemaError("pagination: expected an object with `next`")
    next_url = pagination["next"]
    if next_url is not None and not isinstance(next_url, str):
        raise SchemaError("pagination.next: expected a string or null")
    parsed: list[Operation] = []
    rejected: list[str] = []
    for index, item in enumerate(operations):
        try:
            parsed.append(parse_operation(item, served_at=served_at))
        except SchemaError as exc:
            rejected.append(f"operations[{index}]: {exc}")
    return Page(
        operations=tuple(parsed),
        next_token=_page_token(next_url),
        next_url=next_url,
        rejected=tuple(rejected),
        served_at=served_at,
    )


# The fast path: msgspec decodes and checks a well-formed answer in one pass, without building
# dicts (a page of 1,000 in about a fifth of the time). Whatever it refuses goes through the
# parsers above, which say exactly what is wrong, and skip a bad item of a page instead of
# the page: the two agree on every answer both accept (tests/unit/test_operation.py).
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_When = Annotated[datetime, msgspec.Meta(tz=True)]


class _WireStats(msgspec.Struct):
    total: _Count
    queued: _Count
    created: _Count
    failed: _Count


class _WireOperation(msgspec.Struct):
    id: Annotated[str, msgspec.Meta(pattern=rf"^{ID_PATTERN.pattern}\Z")]
    status: Status
    stats: _WireStats
    createdAt: _When
    updatedAt: _When


class _WirePagination(msgspec.Struct):
    next: str | None


class _WirePage(msgspec.Struct):
    operations: list[_WireOperation]
    pagination: _WirePagination


_OPERATION = msgspec.json.Decoder(_WireOperation)
_PAGE = msgspec.json.Decoder(_WirePage)


def _from_wire(wire: _WireOperation, served_at: datetime | None) -> Operation | None:
    """The Operation, or None if the parser must judge it (a year out of range)."""
    try:
        created, updated = wire.createdAt.astimezone(UTC), wire.updatedAt.astimezone(UTC)
    except OverflowError:  # 9999-12-31T23:59:59-01:00 is after year 9999 in UTC
        return None
    if not (MIN_YEAR <= created.year <= MAX_YEAR and MIN_YEAR <= updated.year <= MAX_YEAR):
        return None
    s = wire.stats
    return Operation(
        wire.id,
        wire.status,
        Stats(s.total, s.queued, s.created, s.failed),
        created,
        updated,
        served_at,
    )


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than json can parse
        raise SchemaError("the answer's body is not valid JSON") from None


def decode_operation(
    body: bytes, expected_id: str | None = None, served_at: datetime | None = None
) -> Operation:
    """Decode and validate one SenderPoolOperation answer; SchemaError on any breach."""
    try:
        op = _from_wire(_OPERATION.decode(body), served_at)
    except (msgspec.DecodeError, RecursionError):
        op = None
    if op is None or (expected_id is not None and op.id != expected_id):
        return parse_operation(_loads(body), expected_id=expected_id, served_at=served_at)
    return op


def decode_page(body: bytes, served_at: datetime | None = None) -> Page:
    """Decode and validate a List answer; a bad item is skipped (``rejected``), not the page."""
    try:
        wire = _PAGE.decode(body)
    except (msgspec.DecodeError, RecursionError):
        return parse_page(_loads(body), served_at=served_at)
    ops = [_from_wire(item, served_at) for item in wire.operations]
    if any(op is None for op in ops):
        return parse_page(_loads(body), served_at=served_at)
    next_url = wire.pagination.next
    return Page(
        operations=tuple(op for op in ops if op is not None),
        next_token=_page_token(next_url),
        next_url=next_url,
        served_at=served_at,
    )


def _page_token(next_url: str | None) -> str | None:
    """Extract the opaque pageToken from ``pagination.next`` (a URL or a bare token)."""
    if not next_url:
        return None
    try:
        next_url.encode()  # it goes back into a URL: lone surrogates cannot
        query = parse_qs(urlsplit(next_url).query)
    except ValueError:  # a lone surrogate, or "http://[" (a broken IPv6 host)
        raise SchemaError(f"pagination.next: {next_url[:60]!r} is not a URL or token") from None
    tokens = query.get("pageToken")
    return tokens[0] if tokens else next_url


def parse_served_at(value: str | None, now: datetime) -> datetime | None:
    """The instant of a `Date` header, aware UTC; None if absent, unparsable or out of range."""
    if value is None:
        return None
    when = parse_http_date(value, now)
    if when is None or not MIN_YEAR <= when.year <= MAX_YEAR:
        return None
    return when


def format_datetime(value: datetime) -> str:
    """Format an aware datetime the way the API writes them (``records.utc_text``)."""
    return utc_text(value)
