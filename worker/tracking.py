"""What a poll result means for a tracked operation. Knows nothing of Celery, HTTP or SQL.

Each decision takes ``now``: deciding *when* is never hidden behind the wall clock. The
functions return plain dicts of column values so the caller can write many rows in bulk.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy.orm import Session, sessionmaker

from worker.db import ENDED_STATES, NOT_FOUND
from worker.errors import ApiError
from worker.operation import Operation, validate_operation_id
from worker.repository import Claim, Repository, TrackResult
from worker.retry_after import RetryPolicy


class Known(Protocol):
    """What a poll decision reads of a tracked operation (an ORM row or a Core row)."""

    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def total(self) -> int | None: ...
    @property
    def queued(self) -> int | None: ...
    @property
    def created(self) -> int | None: ...
    @property
    def failed(self) -> int | None: ...
    @property
    def polls(self) -> int: ...
    @property
    def consecutive_errors(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def remote_updated_at(self) -> datetime | None: ...


class Outcome(enum.StrEnum):
    """What one poll did to one operation."""

    CHANGED = "changed"  # new stats or status: a history row was written
    UNCHANGED = "unchanged"  # nothing new: only the schedule moved
    NOT_FOUND = "not_found"  # 404: tracking ended
    ERROR = "error"  # 400/500/transport/schema: retried at a backed-off time
    DEFERRED = "deferred"  # the account is paused: retried when the pause ends
    SKIPPED = "skipped"  # not ours to poll (claimed by another sweep, or already ended)


class Strategy(enum.StrEnum):
    """How a sweep asks the API: one GET per operation, or List pages over a createdAt window."""

    FETCH = "fetch"
    LIST = "list"


@dataclass(frozen=True)
class PollPolicy:
    """How often to poll, how to back off, and how a sweep is cut into messages."""

    interval: timedelta = timedelta(seconds=10)
    # Adaptive cadence: an operation whose stats stood still for T is next polled after
    # idle_factor * T, between ``interval`` and ``max_interval``.
    max_interval: timedelta = timedelta(seconds=120)
    idle_factor: float = 0.5
    retry: RetryPolicy = RetryPolicy()
    lease: timedelta = timedelta(seconds=120)
    fetch_chunk: int = 50
    # A List chunk is cut only between two seconds of createdAt, so windows do not overlap.
    list_chunk: int = 5000
    list_threshold: int = 5
    # A never-fetched operation was created at most this long before it was tracked (else it
    # falls back to one GET).
    pending_lookback: timedelta = timedelta(days=1)

    def next_poll(self, now: datetime, last_change: datetime | None) -> datetime:
        """When to poll an operation again, from how long its stats have stood still."""
        idle = (now - last_change).total_seconds() if last_change else 0.0
        wait = min(
            max(self.interval.total_seconds(), self.idle_factor * idle),
            self.max_interval.total_seconds(),
        )
        return now + timedelta(seconds=wait)

    def choose(self, configured: str, due: int) -> Strategy:
        """The strategy for a sweep of ``due`` operations (``auto``: List from a threshold)."""
        if configured != "auto":
            return Strategy(configured)
        return Strategy.LIST if due >= self.list_threshold else Strategy.FETCH

    def chunk_size(self, strategy: Strategy) -> int:
        """Operation IDs per poll message."""
        return self.list_chunk if strategy is Strategy.LIST else self.fetch_chunk


@dataclass(frozen=True)
class PollReport:
    """The outcome of polling one operation."""

    operation_id: str
    outcome: Outcome
    next_poll_at: datetime | None = None
    detail: str = ""


@dataclass(frozen=True)
class Chunk:
    """The operations of one poll message and how to ask for them."""

    strategy: Strategy
    operation_ids: tuple[str, ...]


@dataclass(frozen=True)
class Sweep:
    """One tick's work: claimed operations cut into messages."""

    token: str
    chunks: tuple[Chunk, ...]

    @property
    def operation_ids(self) -> tuple[str, ...]:
        """Every claimed operation."""
        return tuple(i for chunk in self.chunks for i in chunk.operation_ids)


def track(
    sessions: sessionmaker[Session], operation_ids: Sequence[str], now: datetime
) -> TrackResult:
    """Validate every ID first, then start tracking the new ones in one transaction."""
    valid = [validate_operation_id(op_id) for op_id in operation_ids]
    with sessions.begin() as session:
        return Repository(session).add(valid, now)


def sweep(
    sessions: sessionmaker[Session],
    now: datetime,
    limit: int,
    policy: PollPolicy,
    paused_until: datetime | None,
    configured: str = "auto",
) -> Sweep:
    """Claim the operations due at ``now`` (none while the account is paused) and cut them up.

    Chunks follow createdAt order, so a List window per chunk covers few untracked operations;
    a chunk too small for List (the tail of a sweep) is fetched by GET under ``auto``.
    """
    if paused_until is not None and paused_until > now:
        return Sweep("", ())
    with sessions.begin() as session:
        claim: Claim = Repository(session).claim_due(now, limit, policy.lease)
    strategy = policy.choose(configured, len(claim.operation_ids))
    parts = _cut(claim, policy.chunk_size(strategy), by_second=strategy is Strategy.LIST)
    return Sweep(claim.token, tuple(Chunk(policy.choose(configured, len(p)), p) for p in parts))


def _cut(claim: Claim, size: int, by_second: bool) -> list[tuple[str, ...]]:
    """Cut the claimed IDs into parts of about ``size``; with ``by_second``, never inside one
    second of createdAt (List windows have whole-second bounds)."""
    parts: list[tuple[str, ...]] = []
    current: list[str] = []
    previous: datetime | None = None
    for op_id, created in zip(claim.operation_ids, claim.created, strict=True):
        second = created.replace(microsecond=0)
        if len(current) >= size and (not by_second or second != previous):
            parts.append(tuple(current))
            current = []
        current.append(op_id)
        previous = second
    if current:
        parts.append(tuple(current))
    return parts


def observation(
    row: Known, op: Operation, now: datetime, policy: PollPolicy
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The row's new values after ``op`` was seen, and its history row if anything changed.

    An answer older than what is already recorded (a lagging replica behind a List page) only
    moves the schedule: stats never go backwards in the history.
    """
    if row.remote_updated_at is not None and op.updated_at < row.remote_updated_at:
        return {
            "id": row.id,
            "last_polled_at": now,
            "polls": row.polls + 1,
            "claim_token": None,
            "next_poll_at": policy.next_poll(now, row.remote_updated_at),
            "version": row.version + 1,
        }, None
    stats = op.stats
    values: dict[str, Any] = {
        "id": row.id,
        "status": op.status.value,
        "total": stats.total,
        "queued": stats.queued,
        "created": stats.created,
        "failed": stats.failed,
        "remote_created_at": op.created_at,
        "remote_updated_at": op.updated_at,
        "last_polled_at": now,
        "polls": row.polls + 1,
        "consecutive_errors": 0,
        "last_error": None,
        "claim_token": None,
        "version": row.version + 1,
    }
    if op.status.value in ENDED_STATES:
        values["ended_at"] = op.updated_at
    else:
        values["next_poll_at"] = policy.next_poll(now, op.updated_at)
    changed = (row.status, row.total, row.queued, row.created, row.failed) != (
        op.status.value,
        stats.total,
        stats.queued,
        stats.created,
        stats.failed,
    )
    if not changed:
        return values, None
    history = {
        "operation_id": row.id,
        "seq": values["version"],
        "observed_at": now,
        "remote_updated_at": op.updated_at,
        "status": op.status.value,
        "total": stats.total,
        "queued": stats.queued,
        "created": stats.created,
        "failed": stats.failed,
    }
    return values, history


def not_found(row: Known, now: datetime, detail: str) -> dict[str, Any]:
    """The row's new values after a 404: tracking ends as NOT_FOUND."""
    return {
        "id": row.id,
        "status": NOT_FOUND,
        "ended_at": now,
        "last_polled_at": now,
        "polls": row.polls + 1,
        "last_error": detail[:1000],
        "claim_token": None,
        "version": row.version + 1,
    }


def failure(row: Known, error: ApiError, now: datetime, policy: PollPolicy) -> dict[str, Any]:
    """The row's new values after a failed poll: count it and back off this operation."""
    errors = row.consecutive_errors + 1
    wait = max(policy.interval.total_seconds(), policy.retry.backoff(errors))
    return {
        "id": row.id,
        "consecutive_errors": errors,
        "polls": row.polls + 1,
        "last_polled_at": now,
        "last_error": f"{type(error).__name__}: {error}"[:1000],
        "next_poll_at": now + timedelta(seconds=wait),
        "claim_token": None,
        "version": row.version + 1,
    }


def summarize(reports: Sequence[PollReport]) -> dict[str, int]:
    """Counts per outcome, for task results and logs."""
    counts = {outcome.value: 0 for outcome in Outcome}
    for report in reports:
        counts[report.outcome.value] += 1
    return counts
