"""The one duration grammar of settings, CLI options and the HTTP API's parameters.

Plain seconds (``90``, ``2.5``) or numbers with units, largest first or not: ``90s``, ``15m``,
``1h30m``, ``12h``, ``7d``, ``2w``. Pure: no clock, no environment.
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


def parse_duration(text: str) -> timedelta:
    """``text`` as a duration; ValueError saying what is accepted otherwise."""
    raw = text.strip().lower()
    if _PLAIN.fullmatch(raw):
        seconds = float(raw)
    elif _WITH_UNITS.fullmatch(raw):
        seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in _PART.findall(raw))
    else:
        raise ValueError(f"{text!r} is not a duration such as {EXAMPLES}")
    try:
        return timedelta(seconds=seconds)
    except OverflowError:
        raise ValueError(f"{text!r} is longer than any duration optrack can keep") from None


def has_units(text: str) -> bool:
    """True if ``text`` is a duration written with units (``7d``), not a bare number."""
    return _WITH_UNITS.fullmatch(text.strip().lower()) is not None
