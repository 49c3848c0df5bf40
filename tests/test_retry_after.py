"""Retry-After parsing and backoff: pure functions, many header values."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from worker.retry_after import RetryPolicy, parse_retry_after

NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("3", 3.0),
        (" 120 ", 120.0),
        ("0", 0.0),
        ("-5", None),
        ("1.5", 1.5),
        ("Thu, 01 Jan 2026 12:00:30 GMT", 30.0),
        ("Thu, 01 Jan 2026 11:59:00 GMT", 0.0),  # in the past: no wait
        (None, None),
        ("", None),
        ("soon", None),
        ("NaN", None),
        ("inf", None),
        ("1e9", None),
        ("3 seconds", None),
        ("x" * 500, None),
    ],
)
def test_parse_retry_after(header: str | None, seconds: float | None) -> None:
    assert parse_retry_after(header, NOW) == seconds


def test_throttle_delay_caps_and_falls_back_to_backoff() -> None:
    policy = RetryPolicy(max_retry_after=60, backoff_base=2, backoff_max=300)
    assert policy.throttle_delay("3", NOW, attempt=1) == 3
    assert policy.throttle_delay("99999", NOW, attempt=1) == 60
    rng = random.Random(7)
    fallback = policy.throttle_delay("garbage", NOW, attempt=3, rng=rng)
    assert 4.0 <= fallback <= 8.0  # attempt 3: ceiling 8 s, jittered down to half


def test_backoff_grows_and_is_bounded() -> None:
    policy = RetryPolicy(backoff_base=1, backoff_max=30)
    rng = random.Random(1)
    ceilings = [policy.backoff(n, rng) for n in range(1, 12)]
    assert all(
        0.5 * min(30, 2 ** (n - 1)) <= d <= min(30, 2 ** (n - 1)) for n, d in enumerate(ceilings, 1)
    )
    assert policy.backoff(10_000, rng) <= 30
