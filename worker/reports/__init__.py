"""Reports over tracked operations and their history, as a Python API (the CLI is a thin layer).

    summarize(session, period, stuck_after, now, statuses) -> Summary     `optrack report`
    operation_history(session, operation_id, now) -> HistoryReport       `optrack history`
    progress(session, operation_ids) -> tuple[Progress, ...]             `optrack watch`

Figures are computed in SQL; time is passed in, never read. docs/reports.md defines them.
"""

from worker.reports.model import (
    Estimate,
    Flagged,
    Flags,
    HistoryReport,
    HistoryRow,
    OperationState,
    Progress,
    Senders,
    Summary,
    Throughput,
    TimeToFinish,
)
from worker.reports.period import BadPeriod, Period, parse_span, parse_when
from worker.reports.queries import (
    DEFAULT_STUCK_AFTER,
    ESTIMATE_WINDOW,
    active_ids,
    estimates,
    get_operation,
    one_snapshot,
    operation_history,
    operation_pages,
    operations,
    progress,
    status_counts,
    summarize,
)

__all__ = [
    "DEFAULT_STUCK_AFTER",
    "ESTIMATE_WINDOW",
    "BadPeriod",
    "Estimate",
    "Flagged",
    "Flags",
    "HistoryReport",
    "HistoryRow",
    "OperationState",
    "Period",
    "Progress",
    "Senders",
    "Summary",
    "Throughput",
    "TimeToFinish",
    "active_ids",
    "estimates",
    "get_operation",
    "one_snapshot",
    "operation_history",
    "operation_pages",
    "operations",
    "parse_span",
    "parse_when",
    "progress",
    "status_counts",
    "summarize",
]
