"""The reports' Python API on SQLite and PostgreSQL, over a known history (support/report_data)."""

from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support import report_data as data
from tests.support.report_data import DAY, NOW, op_id, shown_figures
from worker import reports
from worker.db import HistoryEntry, TrackedOperation
from worker.errors import NotTracked
from worker.reports import charts
from worker.reports.formats import summary_record, summary_row
from worker.reports.html import report_html

THIRTY_MINUTES = timedelta(minutes=30)
EVERYTHING = reports.Period()


@pytest.fixture
def known(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    data.load(sessions)
    return sessions


def ids(flags: reports.Flags) -> list[str]:
    assert flags.count == len(flags.items)  # no limit given: the whole list
    return [item.operation.id for item in flags.items]


def summary(
    sessions: sessionmaker[Session],
    period: reports.Period = EVERYTHING,
    stuck_after: timedelta = THIRTY_MINUTES,
    statuses: tuple[str, ...] = (),
) -> reports.Summary:
    with sessions() as session:
        return reports.summarize(session, period, stuck_after, NOW, statuses)


def test_summary_of_the_day(known: sessionmaker[Session]) -> None:
    s = summary(known, reports.Period(since=DAY))
    assert s.operations == 7
    assert s.by_status == {
        "PENDING": 1,
        "PROCESSING": 2,
        "COMPLETED": 2,
        "CANCELED": 1,
        "NOT_FOUND": 1,
    }
    assert s.senders == reports.Senders(
        total=60, created=42, failed=2, queued=16, failure_rate=round(2 / 44, 6)
    )
    # A 300 s, B 600 s, C 1200 s: p50 the middle one; p95 at rank 1.9 between 600 and 1200.
    assert s.time_to_finish == reports.TimeToFinish(count=3, p50=600.0, p95=1140.0, max=1200.0)
    # 42 created between C's creation (08:00) and E's latest update (11:50): 230 minutes.
    assert s.throughput == reports.Throughput(
        created=42,
        start=DAY + timedelta(hours=8),
        end=DAY + timedelta(hours=11, minutes=50),
        per_minute=round(42 / 230, 3),
    )
    assert ids(s.stuck) == [op_id("D")]
    [stuck] = s.stuck.items
    assert stuck.last_change_at == DAY + timedelta(hours=11, minutes=10)
    assert stuck.unchanged_seconds == 50 * 60
    assert ids(s.not_found) == [op_id("F")]
    assert s.not_found.items[0].operation.last_error == "HTTP 404: not found"
    assert ids(s.in_error) == [op_id("E")]
    assert s.in_error.items[0].operation.consecutive_errors == 2


def test_summary_of_everything_includes_the_older_operation(known: sessionmaker[Session]) -> None:
    s = summary(known)
    assert s.operations == 8 and s.by_status["COMPLETED"] == 3
    assert (s.senders.total, s.senders.created, s.senders.failed) == (64, 44, 4)
    assert s.senders.failure_rate == round(4 / 48, 6)
    # 300, 600, 1200, 1800: p50 at rank 1.5, p95 at rank 2.85.
    assert s.time_to_finish == reports.TimeToFinish(count=4, p50=900.0, p95=1710.0, max=1800.0)
    assert s.throughput.start == DAY - timedelta(days=9) + timedelta(hours=10)


def test_until_and_status_filters(known: sessionmaker[Session]) -> None:
    before = summary(known, reports.Period(until=DAY))
    assert before.operations == 1 and before.by_status["COMPLETED"] == 1
    assert before.time_to_finish.max == 1800.0

    processing = summary(known, statuses=("PROCESSING",))
    assert processing.operations == 2
    assert processing.senders == reports.Senders(20, 8, 1, 11, round(1 / 9, 6))
    assert processing.time_to_finish == reports.TimeToFinish(0, None, None, None)
    assert ids(processing.stuck) == [op_id("D")] and ids(processing.not_found) == []


def test_lists_can_be_capped_but_counts_stay_whole(known: sessionmaker[Session]) -> None:
    with known() as session:
        s = reports.summarize(session, EVERYTHING, timedelta(minutes=5), NOW, list_limit=1)
        none = reports.summarize(session, EVERYTHING, timedelta(minutes=5), NOW, list_limit=0)
    assert s.stuck.count == 2 and [f.operation.id for f in s.stuck.items] == [op_id("D")]
    assert none.stuck == reports.Flags(2, ()) and none.in_error == reports.Flags(1, ())


def test_stuck_after_is_a_threshold_on_the_last_change(known: sessionmaker[Session]) -> None:
    # D unchanged for 50 min, E for 10 min.
    assert ids(summary(known, stuck_after=timedelta(minutes=5)).stuck) == [op_id("D"), op_id("E")]
    assert ids(summary(known, stuck_after=timedelta(minutes=50)).stuck) == []
    assert ids(summary(known, stuck_after=timedelta(minutes=49)).stuck) == [op_id("D")]


def test_an_empty_database_has_zeros_and_no_rates(sessions: sessionmaker[Session]) -> None:
    s = summary(sessions)
    assert s.operations == 0 and set(s.by_status.values()) == {0}
    assert s.senders == reports.Senders(0, 0, 0, 0, None)
    assert s.time_to_finish == reports.TimeToFinish(0, None, None, None)
    assert s.throughput == reports.Throughput(0, None, None, None)
    assert s.stuck == s.not_found == s.in_error == reports.Flags(0, ())


@pytest.mark.parametrize("count", [1, 2, 5, 20])
def test_percentiles_interpolate_like_percentile_cont(
    sessions: sessionmaker[Session], count: int
) -> None:
    durations = [float((i * 37) % 101 + i) for i in range(count)]  # unordered, distinct
    with sessions.begin() as session:
        for i, seconds in enumerate(durations):
            created = NOW - timedelta(hours=2)
            session.add(
                TrackedOperation(
                    id=f"comms_operation_01h9krwprkeee8fzqspvwy{i:04d}",
                    status="COMPLETED",
                    remote_created_at=created,
                    ended_at=created + timedelta(seconds=seconds),
                    tracked_at=created,
                )
            )
    ordered = sorted(durations)

    def reference(p: float) -> float:
        rank = (count - 1) * p
        low = int(rank)
        high = min(low + 1, count - 1)
        return ordered[low] + (rank - low) * (ordered[high] - ordered[low])

    ttf = summary(sessions).time_to_finish
    assert ttf.count == count
    assert ttf.p50 == pytest.approx(reference(0.5), abs=1e-3)
    assert ttf.p95 == pytest.approx(reference(0.95), abs=1e-3)
    assert ttf.max == max(durations)


def test_history_rows_have_deltas_and_rates(known: sessionmaker[Session]) -> None:
    with known() as session:
        report = reports.operation_history(session, op_id("A"), NOW)
    assert [r.seq for r in report.rows] == [2, 3, 4]
    # From the creation at 10:00 (nothing done, 10 queued): +4 in 1 min, +3/+1 in 2, +2 in 2.
    assert [(r.created_delta, r.failed_delta, r.queued_delta) for r in report.rows] == [
        (4, 0, -4),
        (3, 1, -4),
        (2, 0, -2),
    ]
    assert [r.elapsed_seconds for r in report.rows] == [60.0, 120.0, 120.0]
    assert [r.rate_per_minute for r in report.rows] == [4.0, 2.0, 1.0]
    assert report.estimate.eta is None and report.estimate.note == "ended"
    assert report.operation.status == "COMPLETED"


def test_estimate_of_a_processing_operation(known: sessionmaker[Session]) -> None:
    with known() as session:
        e = reports.operation_history(session, op_id("E"), NOW).estimate
        d = reports.operation_history(session, op_id("D"), NOW).estimate
        g = reports.operation_history(session, op_id("G"), NOW)
    # E: 6 done in the 10 minutes since its creation, 6 left: done at 12:00.
    assert (e.remaining, e.rate_per_minute) == (6, 0.6)
    assert (e.basis_start, e.basis_end) == (
        DAY + timedelta(hours=11, minutes=40),
        DAY + timedelta(hours=11, minutes=50),
    )
    assert e.eta == DAY + timedelta(hours=12)
    # D: 3 done in 10 minutes, 5 left: 1000 s after its last change at 11:10.
    assert d.eta == DAY + timedelta(hours=11, minutes=26, seconds=40)
    assert g.rows == () and g.estimate.eta is None and g.estimate.note == "not fetched yet"


def test_estimate_looks_back_five_changes(sessions: sessionmaker[Session]) -> None:
    """Slow at first, fast lately: the estimate follows the recent rate, not the average."""
    target = "comms_operation_01h9krwprkeee8fzqspvwyxxxx"
    start = NOW - timedelta(hours=1)
    # (minutes after start, done): 1 per minute for 30 min, then 10 per minute.
    steps = [(10, 10), (20, 20), (30, 30), (31, 40), (32, 50), (33, 60), (34, 70), (35, 80)]
    with sessions.begin() as session:
        session.add(
            TrackedOperation(
                id=target,
                status="PROCESSING",
                total=200,
                queued=120,
                created=80,
                failed=0,
                remote_created_at=start,
                remote_updated_at=start + timedelta(minutes=35),
                tracked_at=start,
            )
        )
        session.flush()
        for seq, (minute, done) in enumerate(steps, 2):
            at = start + timedelta(minutes=minute)
            session.add(
                HistoryEntry(
                    operation_id=target,
                    seq=seq,
                    observed_at=at,
                    remote_updated_at=at,
                    status="PROCESSING",
                    total=200,
                    queued=200 - done,
                    created=done,
                    failed=0,
                )
            )
    with sessions() as session:
        estimate = reports.operation_history(session, target, NOW).estimate
    # Five changes back from minute 35 (80 done) is minute 30 (30 done): 10 per minute.
    assert estimate.basis_start == start + timedelta(minutes=30)
    assert estimate.rate_per_minute == 10.0
    assert estimate.eta == start + timedelta(minutes=35 + 12)
    assert estimate.note == "rate over the last 5 change(s)"


def test_progress_and_untracked_ids(known: sessionmaker[Session]) -> None:
    with known() as session:
        items = reports.progress(session, [op_id("E"), op_id("A")])
        assert [p.operation.id for p in items] == [op_id("E"), op_id("A")]
        assert [p.ended for p in items] == [False, True]
        assert items[0].operation.done == 6 and items[1].operation.done == 10
        assert reports.active_ids(session) == (op_id("D"), op_id("E"), op_id("G"))
        missing = "comms_operation_01h9krwprkeee8fzqspvwy6zzz"
        with pytest.raises(NotTracked):
            reports.progress(session, [op_id("A"), missing])
        with pytest.raises(NotTracked):
            reports.operation_history(session, missing, NOW)


def test_charts_and_html_are_real_images_with_the_figures(known: sessionmaker[Session]) -> None:
    with known() as session:
        s = reports.summarize(session, reports.Period(since=DAY), THIRTY_MINUTES, NOW)
        recent = reports.operations(session, reports.Period(since=DAY))
        histories = [reports.operation_history(session, op_id(x), NOW) for x in "AEG"]
    png = charts.png_bytes(charts.history_figure(histories[1]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (990, 495) and len(png) > 20_000

    page = report_html(s, recent, histories)
    assert page.startswith("<!doctype html>") and page.count("<svg") == 2 + len(histories)
    for fetch in ('src="http', 'href="http', "url(http", "@import", "<script", "<link"):
        assert fetch not in page  # nothing to fetch: it opens offline
    assert shown_figures(page) == {
        "operations": "7",
        "senders_total": "60",
        "senders_created": "42",
        "senders_failed": "2",
        "senders_queued": "16",
        "failure_rate": "4.5%",
        "finish_p50_seconds": "10m",
        "finish_p95_seconds": "19m",
        "finish_max_seconds": "20m",
        "finished": "3",
        "created_per_minute": "0.183",
        "stuck": "1",
        "not_found": "1",
        "in_error": "1",
        "status_pending": "1",
        "status_processing": "2",
        "status_completed": "2",
        "status_canceled": "1",
        "status_not_found": "1",
    }
    assert op_id("D") in page and op_id("F") in page and op_id("E") in page


def test_records_have_the_documented_fields(known: sessionmaker[Session]) -> None:
    s = summary(known, reports.Period(since=DAY))
    record = summary_record(s)
    assert record["operations"] == {"total": 7, "by_status": s.by_status}
    assert record["senders"]["failure_rate"] == s.senders.failure_rate
    assert record["time_to_finish_seconds"] == {
        "count": 3,
        "p50": 600.0,
        "p95": 1140.0,
        "max": 1200.0,
    }
    assert record["stuck"]["count"] == 1
    assert record["stuck"]["operations"][0]["id"] == op_id("D")
    assert record["stuck"]["operations"][0]["last_change_at"] == "2026-03-01T11:10:00Z"
    row = summary_row(s)
    assert (
        row["status_processing"] == 2
        and row["stuck"] == 1
        and row["since"] == ("2026-03-01T00:00:00Z")
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("12h", NOW - timedelta(hours=12)),
        ("1h30m", NOW - timedelta(minutes=90)),
        ("now", NOW),
        ("2026-02-01", datetime(2026, 2, 1, tzinfo=UTC)),
        ("2026-02-01T08:30", datetime(2026, 2, 1, 8, 30, tzinfo=UTC)),
        ("2026-02-01T08:30:00Z", datetime(2026, 2, 1, 8, 30, tzinfo=UTC)),
        ("2026-02-01T09:30:00+01:00", datetime(2026, 2, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_parse_when(text: str, expected: datetime) -> None:
    assert reports.parse_when(text, NOW) == expected


@pytest.mark.parametrize("text", ["", "yesterday", "7", "d7", "2026-13-01", "7x", "1h-2m"])
def test_parse_when_refuses_garbage(text: str) -> None:
    with pytest.raises(reports.BadPeriod, match="is not a time"):
        reports.parse_when(text, NOW)


def test_period_must_not_be_empty() -> None:
    with pytest.raises(reports.BadPeriod, match="is not before"):
        reports.Period.parse("2026-02-02", "2026-02-01", NOW)
    with pytest.raises(reports.BadPeriod, match="is not a span"):
        reports.parse_span("half an hour")
    assert reports.parse_span("90s") == timedelta(seconds=90)


def test_one_operation_record_for_status_reports_and_notices() -> None:
    from dataclasses import fields

    from worker.records import OPERATION_FIELDS
    from worker.reports.model import OperationState

    # status --json, the HTTP API, reports and notices share one serializer over these fields.
    assert tuple(f.name for f in fields(OperationState)) == OPERATION_FIELDS
