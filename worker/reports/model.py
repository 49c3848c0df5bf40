"""What the reports return: frozen, typed values with the documented field names."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from worker.credentials import DEFAULT_ACCOUNT
from worker.reports.period import Period
from worker.tracking import ACTIVE_STATES, ENDED_STATES, FINISHED_STATES


@dataclass(frozen=True)
class OperationState:
    """A tracked operation as the reports see it (the documented fields of `optrack status`)."""

    id: str
    status: str
    total: int | None
    queued: int | None
    created: int | None
    failed: int | None
    remote_created_at: datetime | None
    remote_updated_at: datetime | None
    tracked_at: datetime
    last_polled_at: datetime | None  # when the API last confirmed this state
    next_poll_at: datetime | None  # None once ended
    polls: int
    consecutive_errors: int
    last_error: str | None
    ended_at: datetime | None
    account: str = DEFAULT_ACCOUNT  # whose credentials poll it (migration 0012)

    @property
    def ended(self) -> bool:
        """True once the operation reached a final state."""
        return self.status in ENDED_STATES

    @property
    def done(self) -> int:
        """Senders processed so far: created plus failed."""
        return (self.created or 0) + (self.failed or 0)

    @property
    def took_seconds(self) -> float | None:
        """From its createdAt to the end the API gave it (COMPLETED, CANCELED); else None."""
        if self.status not in FINISHED_STATES or self.ended_at is None:
            return None
        if self.remote_created_at is None:
            return None
        return (self.ended_at - self.remote_created_at).total_seconds()


@dataclass(frozen=True)
class Senders:
    """Sender counts summed over the selected operations' latest known state."""

    total: int
    created: int
    failed: int
    queued: int
    failure_rate: float | None  # failed / (created + failed); None when nothing was processed


@dataclass(frozen=True)
class TimeToFinish:
    """Seconds from the API's createdAt to the end, over COMPLETED and CANCELED operations."""

    count: int
    p50: float | None
    p95: float | None
    max: float | None


@dataclass(frozen=True)
class Throughput:
    """Senders created per minute between the earliest createdAt and the latest update."""

    created: int
    start: datetime | None
    end: datetime | None
    per_minute: float | None


@dataclass(frozen=True)
class Flagged:
    """An operation that needs a look: stuck, ended NOT_FOUND, or failing to poll."""

    operation: OperationState
    last_change_at: datetime | None  # observed_at of its latest history row
    unchanged_seconds: float | None  # now - last_change_at


@dataclass(frozen=True)
class Flags:
    """Operations flagged for one reason: how many, and the first of them (all, unless capped)."""

    count: int
    items: tuple[Flagged, ...]


@dataclass(frozen=True)
class Summary:
    """Everything `optrack report` shows, for one period and set of statuses at ``now``."""

    now: datetime
    period: Period
    statuses: tuple[str, ...]  # empty: every status
    stuck_after: timedelta
    operations: int
    by_status: dict[str, int]  # every state, zeros included, in ALL_STATES order
    senders: Senders
    time_to_finish: TimeToFinish
    throughput: Throughput
    stuck: Flags  # longest unchanged first
    not_found: Flags  # latest end first
    in_error: Flags  # most errors in a row first


@dataclass(frozen=True)
class HistoryRow:
    """One recorded change with its deltas and rate against the one before."""

    seq: int
    observed_at: datetime
    remote_updated_at: datetime
    status: str
    total: int
    queued: int
    created: int
    failed: int
    created_delta: int
    failed_delta: int
    queued_delta: int
    elapsed_seconds: float | None  # remote time since the previous row (the first: createdAt)
    rate_per_minute: float | None  # (created_delta + failed_delta) per minute of elapsed


@dataclass(frozen=True)
class Estimate:
    """When a PROCESSING operation should finish at its recent rate; ``eta`` None if no basis."""

    remaining: int | None
    rate_per_minute: float | None
    basis_start: datetime | None
    basis_end: datetime | None
    eta: datetime | None
    note: str


@dataclass(frozen=True)
class HistoryReport:
    """The history of one operation, with its completion estimate."""

    now: datetime
    operation: OperationState
    rows: tuple[HistoryRow, ...]
    estimate: Estimate


@dataclass(frozen=True)
class Progress:
    """Where one operation stands, for `optrack watch`."""

    operation: OperationState
    estimate: Estimate

    @property
    def ended(self) -> bool:
        """True once the operation reached a final state."""
        return self.operation.status not in ACTIVE_STATES
