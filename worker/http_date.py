"""HTTP-dates (RFC 9110 §5.6.7) as a small pure parser: the three forms and the zones seen anyway.

Accepted: IMF-fixdate (``Sun, 06 Nov 1994 08:49:37 GMT``), the obsolete RFC 850 form
(``Sunday, 06-Nov-94 08:49:37 GMT``) and asctime (``Sun Nov  6 08:49:37 1994``); the weekday is
optional and not checked. Senders that ignore "always GMT" are met half-way: ``UT``, ``UTC``,
``Z``, a numeric offset (``+0100``, ``-0000``) or a zone abbreviation with one well-known
meaning (``CET``, ``EST``, ...). Ambiguous ones (``IST``, ``BST``) and anything else are not a
date. A two-digit year is read as RFC 9110 says: never more than 50 years ahead of ``now``.
A year past 9999 is :data:`FAR_FUTURE` (too large to represent, not garbage); before year 1,
:data:`FAR_PAST`.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
FAR_PAST = datetime.min.replace(tzinfo=UTC)
MAX_LENGTH = 100  # the longest valid form is 38 characters; longer text is not a date

_MONTHS = {
    name: number
    for number, name in enumerate(
        ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1
    )
}
# Offsets in hours of abbreviations with a single meaning (email.utils knows the US ones).
_ZONES: dict[str, float] = {
    **{"gmt": 0, "ut": 0, "utc": 0, "z": 0, "wet": 0, "west": 1},
    **{"cet": 1, "cest": 2, "met": 1, "mest": 2, "eet": 2, "eest": 3, "msk": 3},
    **{"est": -5, "edt": -4, "cst": -6, "cdt": -5, "mst": -7, "mdt": -6, "pst": -8, "pdt": -7},
    **{"ast": -4, "adt": -3, "akst": -9, "akdt": -8, "hst": -10, "nst": -3.5, "ndt": -2.5},
    **{"jst": 9, "kst": 9, "hkt": 8, "sgt": 8, "awst": 8, "acst": 9.5, "acdt": 10.5},
    **{"aest": 10, "aedt": 11, "nzst": 12, "nzdt": 13},
}
_TIME = r"(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2})"
_ZONE = r"(?:\s*(?P<zone>[a-z]{1,5}|[+-]\d{2}:?\d{2}))?"
# IMF-fixdate and RFC 850 differ only in separators and the year's digits.
_DAY_FIRST = re.compile(
    rf"(?:[a-z]{{3,9}},?\s*)?(?P<day>\d{{1,2}})[\s-]+(?P<mon>[a-z]{{3}})[\s-]+(?P<year>\d{{2,}})"
    rf"\s+{_TIME}{_ZONE}",
    re.IGNORECASE | re.ASCII,
)
_ASCTIME = re.compile(
    rf"(?:[a-z]{{3,9}},?\s+)?(?P<mon>[a-z]{{3}})\s+(?P<day>\d{{1,2}})\s+{_TIME}\s+(?P<year>\d{{4,}})"
    rf"{_ZONE}",
    re.IGNORECASE | re.ASCII,
)


def parse_http_date(value: str, now: datetime) -> datetime | None:
    """The instant an HTTP-date names, aware UTC; None if ``value`` is not an HTTP-date."""
    text = value.strip()
    if len(text) > MAX_LENGTH:
        return None
    match = _DAY_FIRST.fullmatch(text) or _ASCTIME.fullmatch(text)
    if match is None:
        return None
    month = _MONTHS.get(match["mon"].lower())
    offset = _zone_offset(match["zone"])
    if month is None or offset is None:
        return None
    day, hour, minute, second = (int(match[k]) for k in ("day", "h", "m", "s"))
    if not (1 <= day <= 31 and hour <= 23 and minute <= 59 and second <= 60):
        return None
    second = min(second, 59)  # a leap second names the same instant, near enough
    year = _full_year(match["year"], now)
    if year > 9999:
        return FAR_FUTURE
    if year < 1:
        return FAR_PAST
    try:
        local = datetime(year, month, day, hour, minute, second, tzinfo=UTC)
    except ValueError:  # 30 February
        return None
    try:
        return local - offset
    except OverflowError:  # within a day of the ends of what datetime holds
        return FAR_FUTURE if year == 9999 else FAR_PAST


def _zone_offset(zone: str | None) -> timedelta | None:
    if zone is None:
        return timedelta(0)  # asctime has none; it is GMT
    if zone[0] in "+-":
        digits = zone[1:].replace(":", "")
        hours, minutes = int(digits[:2]), int(digits[2:])
        if hours > 23 or minutes > 59:
            return None
        sign = -1 if zone[0] == "-" else 1
        return sign * timedelta(hours=hours, minutes=minutes)
    known = _ZONES.get(zone.lower())
    return None if known is None else timedelta(hours=known)


def _full_year(digits: str, now: datetime) -> int:
    year = int(digits[:6]) if len(digits) <= 6 else 10**6  # more digits: far beyond 9999
    if len(digits) == 2:
        # RFC 9110: a two-digit year more than 50 years ahead is in the previous century.
        year += now.year - now.year % 100
        if year > now.year + 50:
            year -= 100
    elif len(digits) == 3:
        year += 1900  # RFC 5322's obsolete three-digit years
    return year
