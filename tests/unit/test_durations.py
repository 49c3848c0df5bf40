"""One duration grammar for settings, CLI options and the HTTP API's parameters."""

from __future__ import annotations

from datetime import timedelta

import pytest

from worker.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("2.5", 2.5),
        ("90s", 90),
        ("15m", 900),
        ("1h30m", 5400),
        ("1h 30m", 5400),
        ("12H", 43200),
        ("7d", 604800),
        ("2w", 1209600),
        (" 30m ", 1800),
    ],
)
def test_the_grammar(text: str, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "soon", "1y", "-5", "5 minutes", "m5", "1e3", "inf"])
def test_what_is_not_a_duration_says_what_is(text: str) -> None:
    with pytest.raises(ValueError, match="90, 90s, 15m, 1h30m or 7d"):
        parse_duration(text)


def test_too_long_is_an_error_not_an_overflow() -> None:
    with pytest.raises(ValueError, match="longer than any duration"):
        parse_duration("9" * 30 + "w")


def test_a_duration_is_at_most_100_years_so_a_span_ago_stays_in_the_calendar() -> None:
    from worker.durations import MAX_DURATION, DurationTooLong
    from worker.settings import BOUNDS

    assert parse_duration("36600d") == MAX_DURATION
    for text in ("36601d", "9999999d", "99999999d", "1" + "0" * 400):
        with pytest.raises(DurationTooLong, match="at most 36600d"):
            parse_duration(text)
    # Every duration setting's range fits: a setting's own bound is what refuses it.
    assert all(b.maximum <= MAX_DURATION.total_seconds() for b in BOUNDS.values() if b.unit == "s")
