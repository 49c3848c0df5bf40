"""What a poll result means for a tracked operation. Knows nothing of Celery or the CLI.

Each function takes ``now`` (or a clock): deciding *when* is never hidden behind the wall clock.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.orm.exc import StaleDataError

from worker.client import ApiClient
from worker.db import ENDED_STATES, NOT_FOUND, HistoryEntry, TrackedOperation
from worker.errors import (
    ApiError,
    AuthError,
    OperationNotFound,
    RetryLater,
)
from worker.operation import Operation, validate_operation_id
from worker.repository import Claim, Repository, TrackResult
from worker.retry_after import RetryPolicy

log = logging.getLogger(__name__)


class Outcome(enum.StrEnum):
    """What one poll did to one operation."""

    CHANGED = "changed"  # new stats or status: a history row was written
    UNCHANGED = "unchanged"  # nothing new: only the schedule moved
    NOT_FOUND = "not_found"  # 404: tracking ended
    ERROR = "error"  # 400/500/transport/schema: retried at a backed-off time
    DEFERRED = "deferred"  # the account is paused: retried when the pause ends
    SKIPPED = "skipped"  # not ours to poll (claimed by another sweep, or already ended)


@dataclass(frozen=True)
class PollPolicy:
    """How often to poll and how to back off."""

    interval: timedelta = timedelta(seconds=10)
    retry: RetryPolicy = RetryPolicy()
    lease: timedelta = timedelta(seconds=120)


@dataclass(frozen=True)
class PollReport:
    """The outcome of polling one operation."""

    operation_id: str
    outcome: Outcome
    next_poll_at: datetime | None = None
    detail: str = ""


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
) -> Claim:
    """Claim the operations due at ``now``; nothing while the account is paused."""
    if paused_until is not None and paused_until > now:
        return Claim(token="", operation_ids=())
    with sessions.begin() as session:
        return Repository(session).claim_due(now, limit, policy.lease)


def apply_observation(
    row: TrackedOperation, op: Operation, now: datetime, policy: PollPolicy
) -> bool:
    """Copy a fetched state into ``row``; return True if it differs from what was known."""
    stats = op.stats
    changed = (row.status, row.total, row.queued, row.created, row.failed) != (
        op.status.value,
        stats.total,
        stats.queued,
        stats.created,
        stats.failed,
    )
    row.status = op.status.value
    row.total, row.queued, row.created, row.failed = (
        stats.total,
        stats.queued,
        stats.created,
        stats.failed,
    )
    row.remote_created_at = op.created_at
    row.remote_updated_at = op.updated_at
    row.last_polled_at = now
    row.polls += 1
    row.consecutive_errors = 0
    row.last_error = None
    row.claim_token = None
    if row.status in ENDED_STATES:
        row.ended_at = op.updated_at
    else:
        row.next_poll_at = now + policy.interval
    return changed


def _history_row(row: TrackedOperation, now: datetime) -> HistoryEntry:
    assert row.remote_updated_at is not None
    return HistoryEntry(
        operation_id=row.id,
        seq=row.version,
        observed_at=now,
        remote_updated_at=row.remote_updated_at,
        status=row.status,
        total=row.total or 0,
        queued=row.queued or 0,
        created=row.created or 0,
        failed=row.failed or 0,
    )


class Poller:
    """Polls claimed operations through the client and records what it learns."""

    def __init__(
        self, sessions: sessionmaker[Session], client: ApiClient, policy: PollPolicy
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.policy = policy

    def poll(self, operation_ids: Sequence[str], token: str | None) -> list[PollReport]:
        """Poll each operation still claimed with ``token`` (None: poll regardless of claim)."""
        reports: list[PollReport] = []
        for index, op_id in enumerate(operation_ids):
            if not self._still_ours(op_id, token):
                reports.append(PollReport(op_id, Outcome.SKIPPED))
                continue
            try:
                op = self.client.fetch(op_id)
            except RetryLater as exc:
                reports += self._defer(operation_ids[index:], exc.not_before, token, exc.reason)
                break
            except AuthError as exc:
                paused = self.client.gate.paused_until(self.client.clock.now())
                until = paused[0] if paused else self.client.clock.now() + self.policy.interval
                log.error("credentials rejected, polling paused until %s: %s", until, exc)
                reports += self._defer(operation_ids[index:], until, token, str(exc))
                break
            except OperationNotFound as exc:
                reports.append(self._end_not_found(op_id, token, str(exc)))
            except ApiError as exc:
                reports.append(self._record_error(op_id, token, exc))
            else:
                reports.append(self._record(op, token))
        return reports

    def _still_ours(self, op_id: str, token: str | None) -> bool:
        with self.sessions() as session:
            row = Repository(session).get(op_id)
            if row is None or row.status in ENDED_STATES:
                return False
            return token is None or row.claim_token == token

    def _locked_row(
        self, session: Session, op_id: str, token: str | None
    ) -> TrackedOperation | None:
        row = Repository(session).get_for_update(op_id)
        if row is None or row.status in ENDED_STATES:
            return None
        if token is not None and row.claim_token != token:
            return None
        return row

    def _record(self, op: Operation, token: str | None) -> PollReport:
        now = self.client.clock.now()
        try:
            with self.sessions.begin() as session:
                row = self._locked_row(session, op.id, token)
                if row is None:
                    return PollReport(op.id, Outcome.SKIPPED)
                changed = apply_observation(row, op, now, self.policy)
                session.flush()  # bumps row.version: the history row's seq
                if changed:
                    session.add(_history_row(row, now))
                next_poll = None if row.status in ENDED_STATES else row.next_poll_at
        except (StaleDataError, IntegrityError):
            # Another poll of the same operation committed first; its row stands.
            log.info("poll of %s lost a race with another poll; nothing written", op.id)
            return PollReport(op.id, Outcome.SKIPPED)
        log.info(
            "polled %s: %s total=%d queued=%d created=%d failed=%d%s",
            op.id,
            op.status.value,
            op.stats.total,
            op.stats.queued,
            op.stats.created,
            op.stats.failed,
            "" if changed else " (no change)",
        )
        return PollReport(op.id, Outcome.CHANGED if changed else Outcome.UNCHANGED, next_poll)

    def _end_not_found(self, op_id: str, token: str | None, detail: str) -> PollReport:
        now = self.client.clock.now()
        with self.sessions.begin() as session:
            row = self._locked_row(session, op_id, token)
            if row is None:
                return PollReport(op_id, Outcome.SKIPPED)
            row.status = NOT_FOUND
            row.ended_at = now
            row.last_polled_at = now
            row.polls += 1
            row.last_error = detail[:1000]
            row.claim_token = None
        log.warning("%s: the API says it does not exist; tracking ended as NOT_FOUND", op_id)
        return PollReport(op_id, Outcome.NOT_FOUND, None, detail)

    def _record_error(self, op_id: str, token: str | None, exc: ApiError) -> PollReport:
        now = self.client.clock.now()
        with self.sessions.begin() as session:
            row = self._locked_row(session, op_id, token)
            if row is None:
                return PollReport(op_id, Outcome.SKIPPED)
            row.consecutive_errors += 1
            row.polls += 1
            row.last_polled_at = now
            row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
            wait = max(
                self.policy.interval.total_seconds(),
                self.policy.retry.backoff(row.consecutive_errors),
            )
            row.next_poll_at = now + timedelta(seconds=wait)
            row.claim_token = None
            errors = row.consecutive_errors
            next_poll = row.next_poll_at
        log.warning(
            "%s: poll failed (%s, %d in a row); next poll at %s",
            op_id,
            exc,
            errors,
            next_poll.isoformat(),
        )
        return PollReport(op_id, Outcome.ERROR, next_poll, str(exc))

    def _defer(
        self, op_ids: Sequence[str], until: datetime, token: str | None, reason: str
    ) -> list[PollReport]:
        with self.sessions.begin() as session:
            Repository(session).reschedule(op_ids, until, token)
        log.info("account paused until %s (%s); %d poll(s) deferred", until, reason, len(op_ids))
        return [PollReport(op_id, Outcome.DEFERRED, until, reason) for op_id in op_ids]


def summarize(reports: Sequence[PollReport]) -> dict[str, Any]:
    """Counts per outcome, for task results and logs."""
    counts: dict[str, Any] = {outcome.value: 0 for outcome in Outcome}
    for report in reports:
        counts[report.outcome.value] += 1
    return counts
