"""Retry timing: the Retry-After header and jittered exponential backoff, as pure functions.

A Retry-After is honored as given, up to a cap meant only for absurd values (6 hours, as
urllib3). ``0``, a date in the past, a value under a second or an unusable one do not mean
"call at once": they get a short jittered wait that doubles with each consecutive throttle of
the account, so a storm of 429s costs a handful of requests, not one per tick.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from datetime import datetime

from worker.http_date import FAR_FUTURE, parse_http_date

DEFAULT_MAX_RETRY_AFTER = 21600.0  # 6 hours: only absurd values are cut
MIN_MAX_RETRY_AFTER = 60.0  # a lower cap would call before the API allows, every time
TOO_LARGE = 1e12  # seconds (31,700 years): what a value too large to represent stands for
# delta-seconds: ASCII digits only ("²".isdigit() is true, and float("²") raises).
_SECONDS = re.compile(r"([+-]?)([0-9]+(?:\.[0-9]+)?)", re.ASCII)


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Seconds to wait from a Retry-After value (delta-seconds or HTTP-date), or None if unusable.

    A date in the past means 0. A number or date too large to represent (70 digits, year
    10000) means :data:`TOO_LARGE`, for the caller's cap. Negative seconds, garbage, NaN and
    infinities give None.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    number = _SECONDS.fullmatch(text)
    if number is not None:
        seconds = float(number.group(2))  # inf past 308 digits: still "too large", not garbage
        if number.group(1) == "-" and seconds > 0:
            return None
        return min(seconds, TOO_LARGE)
    when = parse_http_date(text, now)
    if when is None:
        return None
    if when == FAR_FUTURE:
        return TOO_LARGE
    return min(TOO_LARGE, max(0.0, (when - now).total_seconds()))


@dataclass(frozen=True)
class ThrottleWait:
    """How long the account pauses after one 409/429/503, and why."""

    seconds: float
    # "header": Retry-After honored as given; "minimum": 0, past, tiny or unusable, so the
    # jittered minimum that grows with consecutive throttles.
    source: str
    capped: bool = False  # the header asked for more than max_retry_after


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait after a throttling answer or a failed poll."""

    max_retry_after: float = DEFAULT_MAX_RETRY_AFTER
    backoff_base: float = 2.0
    backoff_max: float = 300.0
    # A pause at most this long is waited in place by the client; longer ones go back to the
    # caller as "not before T" so no worker sleeps for minutes.
    max_inplace_wait: float = 5.0
    # Retry-After 0, past, under this, or unusable: this wait, doubled per consecutive
    # throttle up to throttle_wait_max, and jittered up to half again.
    min_throttle_wait: float = 1.0
    throttle_wait_max: float = 300.0
    # A wait in place ends up to this much late (a quarter of the wait at most): processes
    # waiting out the same pause do not all call at the same instant.
    max_wake_jitter: float = 1.0

    def backoff(self, attempt: int, rng: random.Random | None = None) -> float:
        """Jittered exponential backoff for the ``attempt``-th consecutive failure (1-based)."""
        ceiling = min(self.backoff_max, self.backoff_base * 2.0 ** max(0, min(attempt, 32) - 1))
        jitter: float = (rng or random).uniform(0.5, 1.0)
        return ceiling * jitter

    def wake_after(self, remaining: float, rng: random.Random | None = None) -> float:
        """How long to sleep to wait out ``remaining`` seconds of a pause, with jitter."""
        spread = min(self.max_wake_jitter, 0.25 * max(0.0, remaining))
        jitter: float = (rng or random).uniform(0.0, spread)
        return max(0.0, remaining) + jitter

    def minimum_wait(self, throttles: int, rng: random.Random | None = None) -> float:
        """The wait after the ``throttles``-th consecutive throttle without a usable Retry-After."""
        steps = max(0, min(throttles, 32) - 1)
        floor = min(self.throttle_wait_max, self.min_throttle_wait * 2.0**steps)
        jitter: float = (rng or random).uniform(1.0, 1.5)  # never under the floor
        return floor * jitter

    def throttle_wait(
        self, header: str | None, now: datetime, throttles: int, rng: random.Random | None = None
    ) -> ThrottleWait:
        """The account's pause after its ``throttles``-th consecutive 409/429/503 (1-based)."""
        seconds = parse_retry_after(header, now)
        if seconds is None or seconds < self.min_throttle_wait:
            wait = min(self.minimum_wait(throttles, rng), self.max_retry_after)
            return ThrottleWait(wait, "minimum")
        if seconds > self.max_retry_after:
            return ThrottleWait(self.max_retry_after, "header", capped=True)
        return ThrottleWait(seconds, "header")
