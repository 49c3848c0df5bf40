"""The one duration grammar of settings, CLI options and the HTTP API's parameters.

Plain seconds (``90``, ``2.5``) or numbers with units, largest first or not: ``90s``, ``15m``,
``1h30m``, ``12h``, ``7d``, ``2w``, at most ``MAX_DURATION`` (100 years: a span "ago" from
any date of this century stays in the calendar, and it is the longest setting's bound). Pure:
no clock, no environment.
"""

from __future__ import annotations

import re
from datetime import timedelta

UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_NUMBER = r"[0-9]+(?:\.[0-9]+)?"
_PART = re.compile(rf"({_NUMBER})\s*([smhdw])")
_PLAIN = re.compile(_NUMBER)
_WITH_UNITS = re.compile(rf"(?:{_NUMBER}\s*[smhdw]\s*)+")
EXAMPLES = "90, 90s, 15m, 1h30m or 7d"
MAX_DAYS = 36600
MAX_DURATION = timedelta(days=MAX_DAYS)


class DurationTooLong(ValueError):
    """Raised when a duration is in the grammar but longer than ``MAX_DURATION``."""


def parse_duration(text: str) -> timedelta:
    """``text`` as a duration; ValueError saying what is accepted otherwise."""
    raw = text.strip().lower()
    if _PLAIN.fullmatch(raw):
        seconds = float(raw)
    elif _WITH_UNITS.fullmatch(raw):
        seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in _PART.findall(raw))
    else:
        raise ValueError(f"{text!r} is not a duration such as {EXAMPLES}")
    # NaN cannot match the grammar; a number too long for a float is inf, past the bound too.
    if not seconds <= MAX_DURATION.total_seconds():
        shown = text.strip() if len(text.strip()) <= 40 else text.strip()[:40] + "…"
        raise DurationTooLong(
            f"{shown!r} is longer than any duration optrack takes: at most {MAX_DAYS}d (100 years)"
        )
    return timedelta(seconds=seconds)


def has_units(text: str) -> bool:
    """True if ``text`` is a duration written with units (``7d``), not a bare number."""
    return _WITH_UNITS.fullmatch(text.strip().lower()) is not None
