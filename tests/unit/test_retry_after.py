"""Retry-After parsing and backoff: pure functions, many header values (as urllib3 tests them)."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from worker.errors import ConfigError
from worker.retry_after import (
    DEFAULT_MAX_RETRY_AFTER,
    TOO_LARGE,
    RetryPolicy,
    parse_retry_after,
)
from worker.settings import load_settings

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("900", 900.0),
        ("0", 0.0),
        ("-0", 0.0),
        ("+7", 7.0),
        ("-5", None),
        ("1.5", 1.5),
        (None, None),
        ("", None),
        ("   ", None),
        ("soon", None),
        ("NaN", None),
        ("inf", None),
        ("-inf", None),
        ("1e9", None),
        ("0x10", None),
        ("3 seconds", None),
        ("\u00b2", None),  # a Unicode superscript two is not a digit here
        ("x" * 500, None),
        # Too large to represent is "as long as can be", for the cap: not garbage.
        ("12345678901234567890", TOO_LARGE),
        ("1" * 70, TOO_LARGE),
        ("9" * 400, TOO_LARGE),
    ],
)
def test_parse_retry_after_seconds(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        # IMF-fixdate, the obsolete RFC 850 form and asctime (RFC 9110 §5.6.7).
        ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
        ("Thursday, 01-Jan-26 12:00:30 GMT", 30.0),
        ("Thu Jan  1 12:00:30 2026", 30.0),
        ("Thu Jan 1 12:00:30 2026", 30.0),
        ("01 Jan 2026 12:00:30 GMT", 30.0),  # no weekday
        ("thu, 01 jan 2026 12:00:30 gmt", 30.0),  # case is not checked
        # Time zones senders use anyway.
        ("Thu, 01 Jan 2026 12:00:30 -0000", 30.0),  # "UTC, zone unknown" (RFC 5322)
        ("Thu, 01 Jan 2026 12:00:30 +0000", 30.0),
        ("Thu, 01 Jan 2026 12:00:30 UTC", 30.0),
        ("Thu, 01 Jan 2026 12:00:30 UT", 30.0),
        ("Thu, 01 Jan 2026 12:00:30 Z", 30.0),
        ("Thu, 01 Jan 2026 13:00:30 +0100", 30.0),
        ("Thu, 01 Jan 2026 13:00:30 +01:00", 30.0),
        ("Thu, 01 Jan 2026 06:30:30 -0530", 30.0),
        ("Thu, 01 Jan 2026 13:00:30 CET", 30.0),
        ("Thu, 01 Jan 2026 14:00:30 EET", 30.0),
        ("Thu, 01 Jan 2026 07:00:30 EST", 30.0),
        ("Thu, 01 Jan 2026 04:00:30 PST", 30.0),
        ("Thu, 01 Jan 2026 21:00:30 JST", 30.0),
        ("Thu, 01 Jan 2026 12:00:30 IST", None),  # India, Ireland or Israel: not guessed
        ("Thu, 01 Jan 2026 12:00:30 XYZ", None),
        ("Thu, 01 Jan 2026 12:00:30 +2500", None),
        # In the past: no wait (the policy turns it into the minimum wait).
        ("Thu, 01 Jan 2026 11:59:00 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),
        # A two-digit year is never more than 50 years ahead (RFC 9110).
        ("Sunday, 01-Jan-76 12:00:00 GMT", 50 * 365.25 * 86400 - 0.5 * 86400),
        ("Friday, 01-Jan-77 12:00:00 GMT", 0.0),  # 1977
        # Too large to represent.
        ("Fri, 01 Jan 10000 00:00:00 GMT", TOO_LARGE),
        ("Fri, 01 Jan 99999999999 00:00:00 GMT", TOO_LARGE),
        ("Fri, 31 Dec 9999 23:59:59 -0100", TOO_LARGE),
        # Not dates.
        ("Thu, 30 Feb 2026 12:00:30 GMT", None),
        ("Thu, 01 Jan 2026 25:00:30 GMT", None),
        ("Thu, 01 Foo 2026 12:00:30 GMT", None),
        ("Thu, 01 Jan 2026 12:00 GMT", None),
        ("2026-01-01T12:00:30Z", None),
    ],
)
def test_parse_retry_after_http_dates(header: str, seconds: float | None) -> None:
    parsed = parse_retry_after(header, NOW)
    if seconds is None or seconds in (0.0, TOO_LARGE):
        assert parsed == seconds
    else:
        assert parsed == pytest.approx(seconds, abs=86400)  # leap days in the 50-year case


def test_retry_after_is_honored_whole_up_to_six_hours() -> None:
    policy = RetryPolicy()
    assert policy.max_retry_after == DEFAULT_MAX_RETRY_AFTER == 6 * 3600
    assert policy.throttle_wait("900", NOW, 1).seconds == 900  # was cut to 300 s
    assert policy.throttle_wait("21600", NOW, 1).capped is False
    wait = policy.throttle_wait("86400", NOW, 1)
    assert (wait.seconds, wait.source, wait.capped) == (21600, "header", True)
    assert policy.throttle_wait("1" * 70, NOW, 1).seconds == 21600
    assert policy.throttle_wait("Fri, 01 Jan 10000 00:00:00 GMT", NOW, 1).capped


@pytest.mark.parametrize(
    "header",
    ["0", "-0", "0.2", "Thu, 01 Jan 2026 11:00:00 GMT", "-5", "soon", "", None, "NaN"],
)
def test_zero_past_or_unusable_means_a_minimum_wait_that_grows(header: str | None) -> None:
    policy = RetryPolicy(min_throttle_wait=1.0, throttle_wait_max=300.0)
    rng = random.Random(3)
    waits = [policy.throttle_wait(header, NOW, n, rng) for n in range(1, 13)]
    assert {w.source for w in waits} == {"minimum"}
    for n, wait in enumerate(waits, 1):
        floor = min(300.0, 2.0 ** (n - 1))
        assert floor <= wait.seconds <= 1.5 * floor  # jittered upwards, never below the floor
    assert waits[0].seconds < 2 and waits[4].seconds >= 16 and waits[-1].seconds <= 450


def test_a_retry_after_under_the_minimum_is_raised_to_it() -> None:
    policy = RetryPolicy(min_throttle_wait=1.0)
    assert policy.throttle_wait("1", NOW, 5).source == "header"
    assert policy.throttle_wait("0.5", NOW, 1).seconds >= 1.0


def test_the_minimum_wait_is_capped_too() -> None:
    policy = RetryPolicy(max_retry_after=60, min_throttle_wait=1, throttle_wait_max=1000)
    assert policy.throttle_wait("0", NOW, 30).seconds == 60


def test_backoff_grows_and_is_bounded() -> None:
    policy = RetryPolicy(backoff_base=1, backoff_max=30)
    rng = random.Random(1)
    ceilings = [policy.backoff(n, rng) for n in range(1, 12)]
    assert all(
        0.5 * min(30, 2 ** (n - 1)) <= d <= min(30, 2 ** (n - 1)) for n, d in enumerate(ceilings, 1)
    )
    assert policy.backoff(10_000, rng) <= 30


@pytest.mark.parametrize(
    ("raw", "accepted"),
    [("60", True), ("900", True), ("21600", True), ("59.9", False), ("0", False), ("5", False)],
)
def test_optrack_max_retry_after_below_a_minute_is_refused(raw: str, accepted: bool) -> None:
    env = {"OPTRACK_MAX_RETRY_AFTER": raw}
    if accepted:
        assert load_settings(env).max_retry_after == float(raw)
        return
    with pytest.raises(ConfigError, match=r"OPTRACK_MAX_RETRY_AFTER=.* is below 60 s"):
        load_settings(env)


def test_optrack_max_retry_after_defaults_to_six_hours() -> None:
    assert load_settings({}).max_retry_after == 21600
