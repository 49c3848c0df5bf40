"""One duration grammar for settings, CLI options and the HTTP API's parameters."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from worker import reports
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


def test_reports_and_the_health_check_read_the_same_grammar(tmp_path: Path) -> None:
    # `report --stuck-after 90` and `health --max-lag 1h30m` each failed once: one grammar now.
    assert reports.parse_span("90") == timedelta(seconds=90)
    assert reports.parse_span("1h30m") == timedelta(minutes=90)
    env = {"OPTRACK_DATABASE_URL": f"sqlite:///{tmp_path / 'optrack.db'}", "PATH": "/usr/bin:/bin"}
    runs = [["db", "upgrade"], ["health", "--max-lag", "1h30m"], ["report", "--stuck-after", "90"]]
    done = [
        subprocess.run(
            [sys.executable, "-m", "worker", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        for argv in runs
    ]
    assert done[0].returncode == 0, done[0].stderr
    assert done[1].returncode in (0, 1) and "not a duration" not in done[1].stderr  # 1: no beat
    assert done[2].returncode == 0, done[2].stderr
    assert "PROCESSING, unchanged > 1m 30s" in done[2].stdout
