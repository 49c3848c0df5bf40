"""`optrack report`, `history`, `watch` run as a user runs them: subprocesses on real databases.

The known history (tests/support/report_data.py) is placed relative to the real time here, since a
subprocess reads the wall clock: the figures that do not depend on "now" are exact, and the
ones that do (stuck, unchanged for) keep minutes of margin.
"""

from __future__ import annotations

import csv
import io
import json
import struct
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from tests.support import report_data as data
from tests.support.processes import base_env
from tests.support.report_data import op_id, shown_figures
from worker.db import make_engine, make_sessionmaker
from worker.reports.formats import number_text, percent_text, rate_text, span_text

UNTRACKED = "comms_operation_01h9krwprkeee8fzqspvwy6zzz"


def make_env(tmp_path: Path, db_url: str) -> dict[str, str]:
    """The environment of an optrack subprocess on ``db_url``."""
    return base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)


@pytest.fixture
def env(tmp_path: Path, db_url: str) -> dict[str, str]:
    return make_env(tmp_path, db_url)


@pytest.fixture
def day(db_url: str) -> datetime:
    """Load the known history with "now" = the real time; return the start of its day."""
    now = datetime.now(UTC).replace(microsecond=0)
    engine = make_engine(db_url)
    data.load(make_sessionmaker(engine), now)
    engine.dispose()
    return data.day_of(now)


def optrack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(env: dict[str, str], *args: str) -> str:
    result = optrack(env, *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_report_text_json_csv_and_html_agree(
    env: dict[str, str], day: datetime, tmp_path: Path
) -> None:
    since = day.strftime("%Y-%m-%dT%H:%M:%SZ")
    record = json.loads(ok(env, "report", "--since", since, "--json"))
    [row] = list(csv.DictReader(io.StringIO(ok(env, "report", "--since", since, "--csv"))))
    text = ok(env, "report", "--since", since)
    page_path = tmp_path / "report.html"
    ok(env, "report", "--since", since, "--html", str(page_path))
    page = page_path.read_text(encoding="utf-8")

    # JSON: the figures worked out in tests/support/report_data.py.
    assert record["since"] == since and record["until"] is None
    assert record["operations"]["total"] == 7
    assert record["operations"]["by_status"] == {
        "PENDING": 1,
        "PROCESSING": 2,
        "COMPLETED": 2,
        "CANCELED": 1,
        "NOT_FOUND": 1,
    }
    assert record["senders"] == {
        "total": 60,
        "created": 42,
        "failed": 2,
        "queued": 16,
        "failure_rate": round(2 / 44, 6),
    }
    assert record["time_to_finish_seconds"] == {
        "count": 3,
        "p50": 600.0,
        "p95": 1140.0,
        "max": 1200.0,
    }
    assert record["throughput"]["created_per_minute"] == round(42 / 230, 3)
    for key, letter in (("stuck", "D"), ("not_found", "F"), ("in_error", "E")):
        assert record[key]["count"] == 1
        assert [r["id"] for r in record[key]["operations"]] == [op_id(letter)]

    # CSV: the same figures, flat.
    flat = {
        "operations": record["operations"]["total"],
        **{f"status_{k.lower()}": v for k, v in record["operations"]["by_status"].items()},
        **{f"senders_{k}": v for k, v in record["senders"].items() if k != "failure_rate"},
        "failure_rate": record["senders"]["failure_rate"],
        "finished": record["time_to_finish_seconds"]["count"],
        "finish_p50_seconds": record["time_to_finish_seconds"]["p50"],
        "finish_p95_seconds": record["time_to_finish_seconds"]["p95"],
        "finish_max_seconds": record["time_to_finish_seconds"]["max"],
        "throughput_start": record["throughput"]["start"],
        "throughput_end": record["throughput"]["end"],
        "created_per_minute": record["throughput"]["created_per_minute"],
        "stuck": record["stuck"]["count"],
        "not_found": record["not_found"]["count"],
        "in_error": record["in_error"]["count"],
        "since": since,
        "until": None,
        "stuck_after_seconds": 1800.0,
    }
    assert {k: row[k] for k in flat} == {k: "" if v is None else str(v) for k, v in flat.items()}

    # HTML: every shown figure is the CSV's value, formatted for people.
    shown = shown_figures(page)
    counts = [k for k in flat if k.startswith(("status_", "senders_"))]
    counts += ["operations", "finished", "stuck", "not_found", "in_error"]
    for key in counts:
        assert shown[key] == number_text(int(row[key])), key
    assert shown["failure_rate"] == percent_text(float(row["failure_rate"])) == "4.5%"
    for key in ("finish_p50_seconds", "finish_p95_seconds", "finish_max_seconds"):
        assert shown[key] == span_text(float(row[key])), key
    assert shown["created_per_minute"] == rate_text(float(row["created_per_minute"]))
    assert "<svg" in page and page.count('class="op"') == 6

    # Text: the same figures, and the operations that need a look.
    for figure in ("60", "42", "16", "4.5%", "10m", "19m", "20m", "0.183"):
        assert f" {figure} " in text, figure
    for letter in "DEF":
        assert op_id(letter) in text


def test_report_status_filter_and_until(env: dict[str, str], day: datetime) -> None:
    processing = json.loads(ok(env, "report", "--status", "processing", "--json"))
    assert processing["statuses"] == ["PROCESSING"]
    assert processing["operations"]["total"] == 2 and processing["senders"]["total"] == 20
    older = json.loads(ok(env, "report", "--until", "12h", "--json"))  # before "the day"
    assert older["operations"]["total"] == 1
    assert older["time_to_finish_seconds"]["max"] == 1800.0


def test_history_formats_agree_and_plot(env: dict[str, str], day: datetime, tmp_path: Path) -> None:
    target = op_id("A")
    record = json.loads(ok(env, "history", target, "--json"))
    rows = list(csv.DictReader(io.StringIO(ok(env, "history", target, "--csv"))))
    plot = tmp_path / "a.png"
    text = ok(env, "history", target, "--plot", str(plot))

    assert record["operation"]["id"] == target and record["operation"]["status"] == "COMPLETED"
    assert [r["seq"] for r in record["history"]] == [2, 3, 4]
    assert [r["rate_per_minute"] for r in record["history"]] == [4.0, 2.0, 1.0]
    assert record["estimate"]["eta"] is None and record["estimate"]["note"] == "ended"
    assert [{k: str(v) for k, v in r.items()} for r in record["history"]] == rows
    for needle in ("+4", "+3", "+2", "4", "2", "1", "estimated finish: none (ended)", "took 5m"):
        assert needle in text

    png = plot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", png[16:24]) == (990, 495)


def test_history_of_a_processing_operation_has_an_eta(env: dict[str, str], day: datetime) -> None:
    record = json.loads(ok(env, "history", op_id("E"), "--json"))
    estimate = record["estimate"]
    assert estimate["rate_per_minute"] == 0.6 and estimate["remaining"] == 6
    assert estimate["eta"] == (day + timedelta(hours=12)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert "estimated finish:" in ok(env, "history", op_id("E"))


def test_watch_and_track_wait_end_when_the_operations_have(
    env: dict[str, str], day: datetime
) -> None:
    out = ok(env, "watch", op_id("A"), op_id("C"), "--interval", "0.2")
    assert "all 2 operation(s) ended" in out
    assert "COMPLETED" in out and "CANCELED" in out
    waited = ok(env, "track", op_id("B"), "--wait")
    assert f"already tracked {op_id('B')}" in waited and "all 1 operation(s) ended" in waited


def test_watch_with_nothing_active(env: dict[str, str]) -> None:
    assert "nothing to watch" in ok(env, "watch")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("report", "--since", "2026-02-02", "--until", "2026-02-01"), "is not before"),
        (("report", "--since", "last tuesday"), "'last tuesday' is not a time"),
        (("report", "--until", "2026-02-30"), "is not a time"),
        (("report", "--stuck-after", "soon"), "'soon' is not a span"),
        (("report", "--json", "--csv"), "choose one"),
        (("report", "--status", "DONE"), "Invalid value for '--status'"),
        (("history", "nope"), "'nope' is not an operation ID"),
        (("history", UNTRACKED, "--json", "--csv"), "choose one"),
        (("watch", "nope"), "'nope' is not an operation ID"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    tmp_path: Path, sqlite_url: str, args: tuple[str, ...], message: str
) -> None:
    # Refused before the database is read: one backend is enough.
    result = optrack(make_env(tmp_path, sqlite_url), *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("command", ["history", "watch"])
def test_an_untracked_id_exits_2(env: dict[str, str], day: datetime, command: str) -> None:
    result = optrack(env, command, UNTRACKED)
    assert result.returncode == 2, result.stderr
    assert f"{UNTRACKED} is not tracked; see `optrack status`" in result.stderr
