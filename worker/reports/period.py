"""A report's period and spans, parsed from command-line text at the edge; ``now`` injected."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from worker.durations import EXAMPLES, DurationTooLong, has_units, parse_duration
from worker.errors import OptrackError


class BadPeriod(OptrackError, ValueError):
    """Raised when a report's period, span or status filter is unusable."""


def parse_span(text: str) -> timedelta:
    """A span in the one duration grammar (``90``, ``30m``, ``1h30m``, ``7d``)."""
    try:
        return parse_duration(text)
    except DurationTooLong as exc:
        raise BadPeriod(str(exc)) from None
    except ValueError:
        raise BadPeriod(f"{text!r} is not a span; use a duration such as {EXAMPLES}") from None


def parse_when(text: str, now: datetime) -> datetime:
    """A time: ISO 8601 date or datetime (naive means UTC), ``now``, or a span ago (``7d``).

    Its UTC instant must be in the calendar (years 1 to 9999): ``0001-01-01T00:00:00+01:00``
    is a BadPeriod, not an OverflowError.
    """
    raw = text.strip()
    if raw.lower() == "now":
        return now
    if has_units(raw):
        span = parse_span(raw)
        try:
            return now - span
        except OverflowError:
            raise BadPeriod(f"{text.strip()!r} ago is before the year 1") from None
    try:
        if len(raw) == 10:
            day = date.fromisoformat(raw)
            return datetime(day.year, day.month, day.day, tzinfo=UTC)
        value = datetime.fromisoformat(raw.replace("z", "Z"))
    except ValueError:
        raise BadPeriod(
            f"{text!r} is not a time; use an ISO 8601 date or datetime "
            "(2026-01-31, 2026-01-31T08:00Z) or a span ago (30m, 12h, 7d)"
        ) from None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:
        raise BadPeriod(
            f"{text.strip()!r} is outside the calendar in UTC (years 1 to 9999)"
        ) from None


@dataclass(frozen=True)
class Period:
    """Operations whose ``tracked_at`` is in [since, until); an open end is unbounded."""

    since: datetime | None = None
    until: datetime | None = None

    def __post_init__(self) -> None:
        if self.since is not None and self.until is not None and self.since >= self.until:
            raise BadPeriod(
                f"the period is empty: since {self.since:%Y-%m-%d %H:%M:%S} UTC is not "
                f"before until {self.until:%Y-%m-%d %H:%M:%S} UTC"
            )

    @classmethod
    def parse(cls, since: str | None, until: str | None, now: datetime) -> Period:
        """Build a period from command-line text (see ``parse_when``)."""
        return cls(
            since=None if since is None else parse_when(since, now),
            until=None if until is None else parse_when(until, now),
        )
