"""Retry timing: the Retry-After header and jittered exponential backoff, as pure functions."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime

DEFAULT_MAX_RETRY_AFTER = 300.0
# delta-seconds: ASCII digits only ("²".isdigit() is true, and float("²") raises).
_SECONDS = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]+)?)", re.ASCII)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None if unusable.

    A date in the past means "now" (0). Negative seconds, garbage, NaN and infinities give None
    so the caller falls back to backoff.
    """
    if value is None:
        return None
    text = value.strip()
    if not text or len(text) > 64:
        return None
    number = _SECONDS.fullmatch(text)
    if number is not None:
        if number.group(1) == "-" and float(number.group(2)) > 0:
            return None
        return float(number.group(2))
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 HTTP-dates are GMT; parsedate gives naive for "-0000".
        return None
    return max(0.0, (when - now).total_seconds())


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait after a throttling answer or a failed poll."""

    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    # A pause at most this long is waited in place by the client; longer ones go back to the
    # caller as "not before T" so no worker sleeps for minutes.
    max_inplace_wait: float = 5.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Jittered exponential backoff for the ``attempt``-th consecutive failure (1-based)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** max(0, min(attempt, 32) - 1))
        jitter: float = (rng or random).uniform(0.5, 1.0)
        return ceiling * jitter

    def throttle_delay(
        self, header: str | None, now: datetime, attempt: int, rng: random.Random | None = None
    ) -> float:
        """Seconds to pause the account after 409/429/503: Retry-After if usable, else backoff."""
        seconds = parse_retry_after(header, now)
        if seconds is None:
            seconds = self.backoff(attempt, rng)
        return min(seconds, self.max_retry_after)
