"""A report's period and spans, parsed from command-line text at the edge; ``now`` injected."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from worker.errors import OptrackError

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_SPAN = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


class BadPeriod(OptrackError, ValueError):
    """Raised when a report's period, span or status filter is unusable."""


def parse_span(text: str) -> timedelta:
    """A span like ``30m``, ``12h``, ``7d``, ``1h30m`` (units s, m, h, d, w)."""
    raw = text.strip().lower()
    parts = _SPAN.findall(raw)
    if not raw or "".join(n + u for n, u in parts) != raw:
        raise BadPeriod(f"{text!r} is not a span; use a number and a unit, like 30m, 12h or 7d")
    return timedelta(seconds=sum(float(n) * _UNITS[u] for n, u in parts))


def parse_when(text: str, now: datetime) -> datetime:
    """A time: ISO 8601 date or datetime (naive means UTC), ``now``, or a span ago (``7d``)."""
    raw = text.strip()
    if raw.lower() == "now":
        return now
    if re.fullmatch(r"(?:\d+(?:\.\d+)?[smhdw])+", raw.lower()):
        return now - parse_span(raw)
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
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


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
