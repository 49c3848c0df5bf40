"""Reports as records with stable field names (JSON, CSV) and as short text for people.

The field names here are the documented interface (README "Reports", docs/reports.md):
add fields, never rename or remove one.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from worker.db import AccountPause
from worker.records import iso, operation_record, utc_text
from worker.reports.model import (
    Estimate,
    Flagged,
    Flags,
    HistoryReport,
    HistoryRow,
    Summary,
)
from worker.reports.shapes import (
    AccountRecord,
    EstimateRecord,
    FlaggedRecord,
    FlagsRecord,
    HistoryRecord,
    HistoryRowRecord,
    SummaryRecord,
)
from worker.tracking import ALL_STATES

# One colour per status for every picture of one: charts, the HTML report, the terminal, the
# dashboard (served as /palette.css).
STATUS_COLORS = {
    "PENDING": "#90a4ae",
    "PROCESSING": "#1e88e5",
    "COMPLETED": "#2e7d32",
    "CANCELED": "#f9a825",
    "NOT_FOUND": "#c62828",
}
assert set(STATUS_COLORS) == set(ALL_STATES)

# One row per report: append daily runs to a sheet and the columns line up.
SUMMARY_CSV_FIELDS = (
    "now",
    "since",
    "until",
    "statuses",
    "stuck_after_seconds",
    "operations",
    *(f"status_{state.lower()}" for state in ALL_STATES),
    "senders_total",
    "senders_created",
    "senders_failed",
    "senders_queued",
    "failure_rate",
    "finished",
    "finish_p50_seconds",
    "finish_p95_seconds",
    "finish_max_seconds",
    "throughput_start",
    "throughput_end",
    "created_per_minute",
    "stuck",
    "not_found",
    "in_error",
)
HISTORY_CSV_FIELDS = tuple(HistoryRowRecord.__annotations__)


def flagged_record(item: Flagged) -> FlaggedRecord:
    """A flagged operation: its fields, plus when its stats last changed."""
    return {
        **operation_record(item.operation),
        "last_change_at": iso(item.last_change_at),
        "unchanged_seconds": item.unchanged_seconds,
    }


def flags_record(flags: Flags) -> FlagsRecord:
    """A list of flagged operations: the full count, and the operations (capped by --limit)."""
    return {"count": flags.count, "operations": [flagged_record(f) for f in flags.items]}


def summary_record(summary: Summary) -> SummaryRecord:
    """`optrack report --json`."""
    ttf, senders = summary.time_to_finish, summary.senders
    return {
        "now": utc_text(summary.now),
        "since": iso(summary.period.since),
        "until": iso(summary.period.until),
        "statuses": list(summary.statuses),
        "stuck_after_seconds": summary.stuck_after.total_seconds(),
        "operations": {"total": summary.operations, "by_status": dict(summary.by_status)},
        "senders": {
            "total": senders.total,
            "created": senders.created,
            "failed": senders.failed,
            "queued": senders.queued,
            "failure_rate": senders.failure_rate,
        },
        "time_to_finish_seconds": {
            "count": ttf.count,
            "p50": ttf.p50,
            "p95": ttf.p95,
            "max": ttf.max,
        },
        "throughput": {
            "created": summary.throughput.created,
            "start": iso(summary.throughput.start),
            "end": iso(summary.throughput.end),
            "created_per_minute": summary.throughput.per_minute,
        },
        "stuck": flags_record(summary.stuck),
        "not_found": flags_record(summary.not_found),
        "in_error": flags_record(summary.in_error),
    }


def summary_row(summary: Summary) -> dict[str, Any]:
    """`optrack report --csv`: the same figures, flat, counts for the lists."""
    s, ttf, tp = summary.senders, summary.time_to_finish, summary.throughput
    row: dict[str, Any] = {
        "now": iso(summary.now),
        "since": iso(summary.period.since),
        "until": iso(summary.period.until),
        "statuses": " ".join(summary.statuses),
        "stuck_after_seconds": summary.stuck_after.total_seconds(),
        "operations": summary.operations,
        **{f"status_{state.lower()}": n for state, n in summary.by_status.items()},
        "senders_total": s.total,
        "senders_created": s.created,
        "senders_failed": s.failed,
        "senders_queued": s.queued,
        "failure_rate": s.failure_rate,
        "finished": ttf.count,
        "finish_p50_seconds": ttf.p50,
        "finish_p95_seconds": ttf.p95,
        "finish_max_seconds": ttf.max,
        "throughput_start": iso(tp.start),
        "throughput_end": iso(tp.end),
        "created_per_minute": tp.per_minute,
        "stuck": summary.stuck.count,
        "not_found": summary.not_found.count,
        "in_error": summary.in_error.count,
    }
    return row


def history_row_record(row: HistoryRow) -> HistoryRowRecord:
    """One history row: the stored fields, then deltas, elapsed time and rate."""
    # Not dataclasses.asdict: it deep-copies (a history can have thousands of rows).
    return {
        "seq": row.seq,
        "observed_at": utc_text(row.observed_at),
        "remote_updated_at": utc_text(row.remote_updated_at),
        "status": row.status,
        "total": row.total,
        "queued": row.queued,
        "created": row.created,
        "failed": row.failed,
        "created_delta": row.created_delta,
        "failed_delta": row.failed_delta,
        "queued_delta": row.queued_delta,
        "elapsed_seconds": row.elapsed_seconds,
        "rate_per_minute": row.rate_per_minute,
    }


def estimate_record(estimate: Estimate) -> EstimateRecord:
    """The completion estimate; ``eta`` null when there is no basis (``note`` says why)."""
    return {
        "remaining": estimate.remaining,
        "rate_per_minute": estimate.rate_per_minute,
        "basis_start": iso(estimate.basis_start),
        "basis_end": iso(estimate.basis_end),
        "eta": iso(estimate.eta),
        "note": estimate.note,
    }


def history_record(report: HistoryReport) -> HistoryRecord:
    """`optrack history ID --json`."""
    return {
        "operation": operation_record(report.operation),
        "history": [history_row_record(r) for r in report.rows],
        "estimate": estimate_record(report.estimate),
        "now": utc_text(report.now),
    }


def account_record(pause: AccountPause | None, now: datetime) -> AccountRecord:
    """The account object of `optrack status --json`: the last pause, and what holds at ``now``.

    ``paused_until`` keeps its first form (``isoformat``, microseconds and ``+00:00``).
    """
    return {
        "paused_until": None if pause is None else iso(pause.paused_until),
        "pause_reason": None if pause is None else pause.reason,
        "pause_status_code": None if pause is None else pause.status_code,
        "paused": pause is not None and pause.paused_until > now,
        "pause_updated_at": None if pause is None else iso(pause.updated_at),
        # Until a request sent after the 401/403 is answered 200, whatever pause runs.
        "credentials_rejected": pause is not None and pause.credentials_rejected_at is not None,
        "credentials_rejected_at": None if pause is None else iso(pause.credentials_rejected_at),
        "credentials_error": None if pause is None else pause.credentials_error,
    }


def to_json(payload: Any) -> str:
    """Stable, indented JSON."""
    return json.dumps(payload, indent=2)


def to_csv(records: Sequence[Mapping[str, object]], fields: Sequence[str]) -> str:
    """CSV with a header row; None is an empty cell."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(fields), lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow({k: "" if record.get(k) is None else record[k] for k in fields})
    return out.getvalue()


# --- text for people ----------------------------------------------------------------------


def span_text(seconds: float | None) -> str:
    """A duration people read at a glance, two units at most: 45s, 5m, 5m 30s, 2h 05m, 3d 4h."""
    if seconds is None:
        return "-"
    whole = round(seconds)
    sign, whole = ("-", -whole) if whole < 0 else ("", whole)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    for big, big_unit, small, small_unit in (
        (days, "d", hours, "h"),
        (hours, "h", minutes, "m"),
        (minutes, "m", secs, "s"),
    ):
        if big:
            return f"{sign}{big}{big_unit}" + (f" {small:02d}{small_unit}" if small else "")
    return f"{sign}{secs}s"


def time_text(value: datetime | None) -> str:
    """A UTC time to the second, or a dash."""
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S")


def percent_text(fraction: float | None) -> str:
    """A rate as a percentage with one decimal, or a dash."""
    return "-" if fraction is None else f"{fraction * 100:.1f}%"


def number_text(value: float | int | None, digits: int = 2) -> str:
    """A count or a rate, or a dash."""
    if value is None:
        return "-"
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def period_text(summary: Summary) -> str:
    """The period and filter in words."""
    since, until = summary.period.since, summary.period.until
    if since is None and until is None:
        span = "all tracked operations"
    else:
        span = (
            f"operations tracked from {time_text(since) if since else 'the start'} "
            f"to {time_text(until) if until else 'now'} UTC"
        )
    if summary.statuses:
        span += ", status " + " or ".join(summary.statuses)
    return span


def eta_text(estimate: Estimate, now: datetime) -> str:
    """When it should finish, relative to now, or why there is no estimate."""
    if estimate.eta is None:
        return estimate.note or "-"
    left = (estimate.eta - now).total_seconds()
    if left < 0:
        return f"{time_text(estimate.eta)} UTC (overdue by {span_text(-left)})"
    return f"{time_text(estimate.eta)} UTC (in {span_text(left)})"


def rate_text(value: float | None) -> str:
    """A rate: two decimals, or three significant digits below 1 (0.00312 is not 0.00)."""
    if value is None:
        return "-"
    return f"{value:,.2f}" if abs(value) >= 1 or value == 0 else f"{value:.3g}"
