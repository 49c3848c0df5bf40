"""The JSON records of the reports, one TypedDict each: `report --json`, `history --json`, the
account, and the HTTP API's answers built from them.

Each is the one definition of its record: ``formats`` builds it (mypy checks every key and
type of the literal), and the OpenAPI document's schema is derived from it
(``msgspec.json.schema``). Field names are the documented interface: add, never rename.
"""

from __future__ import annotations

from typing import Annotated, TypedDict

import msgspec

from worker.records import OperationRecord, Time


class FlaggedRecord(OperationRecord):
    """An operation that needs a look: its record, and when its stats last changed."""

    last_change_at: Time | None
    unchanged_seconds: float | None


class FlagsRecord(TypedDict):
    """Operations flagged for one reason: the full count, the first ``limit`` operations."""

    count: int
    operations: list[FlaggedRecord]


class OperationCounts(TypedDict):
    """How many operations were selected, and how many are in each status (zeros too)."""

    total: int
    by_status: dict[str, int]


class SendersRecord(TypedDict):
    """Sender counts summed over the selected operations' latest known state."""

    total: int
    created: int
    failed: int
    queued: int
    failure_rate: Annotated[
        float | None, msgspec.Meta(description="failed / (created + failed); null if none")
    ]


class TimeToFinishRecord(TypedDict):
    """Seconds from createdAt to the end, over the COMPLETED and CANCELED operations."""

    count: int
    p50: float | None
    p95: float | None
    max: float | None


class ThroughputRecord(TypedDict):
    """Senders created per minute between the earliest createdAt and the latest update."""

    created: int
    start: Time | None
    end: Time | None
    created_per_minute: float | None


class SummaryRecord(TypedDict):
    """`optrack report --json`: the figures of a period (docs/reports.md)."""

    now: Time
    since: Time | None
    until: Time | None
    statuses: list[str]
    stuck_after_seconds: float
    operations: OperationCounts
    senders: SendersRecord
    time_to_finish_seconds: TimeToFinishRecord
    throughput: ThroughputRecord
    stuck: FlagsRecord
    not_found: FlagsRecord
    in_error: FlagsRecord


class HistoryRowRecord(TypedDict):
    """One recorded change, with its deltas and rate against the one before."""

    seq: int
    observed_at: Time
    remote_updated_at: Time
    status: str
    total: int
    queued: int
    created: int
    failed: int
    created_delta: int
    failed_delta: int
    queued_delta: int
    elapsed_seconds: float | None
    rate_per_minute: float | None


class EstimateRecord(TypedDict):
    """When a PROCESSING operation should finish at its recent rate; ``eta`` null without a
    basis (``note`` says why)."""

    remaining: int | None
    rate_per_minute: float | None
    basis_start: Time | None
    basis_end: Time | None
    eta: Time | None
    note: str


class HistoryRecord(TypedDict):
    """`optrack history ID --json`: the operation, each recorded change, the estimate."""

    operation: OperationRecord
    history: list[HistoryRowRecord]
    estimate: EstimateRecord
    now: Time


class AccountRecord(TypedDict):
    """The account's last pause, and what holds now (`optrack status --json`'s ``account``)."""

    paused_until: Time | None
    pause_reason: str | None
    pause_status_code: int | None
    paused: bool
    pause_updated_at: Time | None
    credentials_rejected: Annotated[
        bool,
        msgspec.Meta(description="A 401 or 403 came, and no request sent since was answered 200"),
    ]
    credentials_rejected_at: Time | None
    credentials_error: Annotated[
        str | None, msgspec.Meta(description="Why the credentials were rejected")
    ]
