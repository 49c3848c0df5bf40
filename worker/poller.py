"""Polls claimed operations through the API client and writes what it learned in bulk.

Network first, then one transaction per message: the rows still claimed with the sweep's
token are locked, updated with one bulk UPDATE, and their history appended with one bulk
INSERT. A crash before the commit writes nothing; the claim's lease runs out and the
operations are due again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Row
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from worker.client import ApiClient, next_page_token
from worker.db import ENDED_STATES
from worker.errors import ApiError, AuthError, OperationNotFound, RetryLater, ServerError
from worker.operation import Operation
from worker.repository import Repository
from worker.tracking import (
    Outcome,
    PollPolicy,
    PollReport,
    Strategy,
    failure,
    not_found,
    observation,
)

log = logging.getLogger(__name__)
Result = Operation | ApiError
# Called inside the write transaction for every operation that reached an end.
EndHook = Callable[[Session, dict[str, Any], datetime], None]


class _OutOfTime(Exception):
    """The message's claim is about to expire: stop calling, write what was learned."""


@dataclass
class _Deferral:
    until: datetime
    reason: str


@dataclass(frozen=True)
class PollStats:
    """What one message cost and wrote, for logs, metrics and the benchmark."""

    requests: int
    rows_updated: int
    history_rows: int


class Poller:
    """Polls operations claimed by a sweep and records the results."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        client: ApiClient,
        policy: PollPolicy,
        on_end: Sequence[EndHook] = (),
    ) -> None:
        self.sessions = sessions
        self.client = client
        self.policy = policy
        self.on_end = list(on_end)
        self.last_stats = PollStats(0, 0, 0)
        self._deadline: datetime | None = None

    def poll(
        self,
        operation_ids: Sequence[str],
        token: str | None,
        strategy: Strategy = Strategy.FETCH,
    ) -> list[PollReport]:
        """Poll each operation still claimed with ``token`` (None: whatever its claim)."""
        with self.sessions() as session:
            rows = Repository(session).claimed(operation_ids, token)
        results: dict[str, Result] = {}
        deferral: _Deferral | None = None
        sent_before = self.client.requests_sent
        # The claim's lease ends at the rows' next_poll_at: write before another sweep takes
        # them back, and leave what is left for the next tick.
        self._deadline = (
            min(row.next_poll_at for row in rows) - self.policy.lease / 4
            if token is not None and rows
            else None
        )
        try:
            if strategy is Strategy.LIST and rows:
                self._list(rows, results)
            for row in rows:
                if row.id not in results:
                    self._check_deadline()
                    results[row.id] = self._fetch(row.id)
        except _OutOfTime:
            now = self.client.clock.now()
            deferral = _Deferral(now, "the claim's lease was running out")
            log.warning(
                "message out of time after %d result(s); the rest is due again", len(results)
            )
        except RetryLater as exc:
            deferral = _Deferral(exc.not_before, exc.reason)
        except AuthError as exc:
            now = self.client.clock.now()
            paused = self.client.gate.paused_until(now)
            deferral = _Deferral(paused[0] if paused else now + self.policy.interval, str(exc))
            log.error("credentials rejected, polling paused until %s: %s", deferral.until, exc)
        reports = self._write(operation_ids, token, results, deferral)
        self.last_stats = PollStats(
            self.client.requests_sent - sent_before,
            self.last_stats.rows_updated,
            self.last_stats.history_rows,
        )
        seen = {r.operation_id for r in reports}
        reports += [PollReport(i, Outcome.SKIPPED) for i in operation_ids if i not in seen]
        return reports

    def _check_deadline(self) -> None:
        if self._deadline is not None and self.client.clock.now() >= self._deadline:
            raise _OutOfTime

    def _fetch(self, op_id: str) -> Result:
        try:
            return self.client.fetch(op_id)
        except (AuthError, RetryLater):
            raise
        except ApiError as exc:
            return exc

    def _list(self, rows: Sequence[Row[Any]], results: dict[str, Result]) -> None:
        """Fill ``results`` from List pages over the rows' createdAt window (no status filter:
        it would hide the operations that just ended)."""
        lookback = self.policy.pending_lookback
        starts = [r.remote_created_at or r.tracked_at - lookback for r in rows]
        ends = [r.remote_created_at or r.tracked_at for r in rows]
        wanted = {r.id for r in rows}
        pad = timedelta(seconds=1)  # startDate/endDate are exclusive, at whole seconds
        seen: set[str] = set()
        try:
            token: str | None = None
            while True:
                self._check_deadline()
                page = self.client.list_page(
                    start_date=min(starts) - pad,
                    end_date=max(ends) + pad,
                    page_size=1000,
                    page_token=token,
                )
                for op in page.operations:
                    if op.id in wanted:
                        results[op.id] = op
                if page.rejected:
                    log.warning(
                        "List page: %d item(s) broke the schema and were skipped: %s",
                        len(page.rejected),
                        "; ".join(page.rejected[:3]),
                    )
                if page.next_token is None:
                    return
                token = next_page_token(page, seen)
        except (AuthError, RetryLater):
            raise
        except ApiError as exc:
            if isinstance(exc, OperationNotFound):
                # The List endpoint has no 404: this one says nothing about our operations.
                exc = ServerError(exc.status, exc.errors, exc.url)
            # A failed page is a failed poll for every operation it should have covered.
            for row in rows:
                results.setdefault(row.id, exc)
            log.warning("List page failed (%s); %d operation(s) backed off", exc, len(rows))

    def _write(
        self,
        operation_ids: Sequence[str],
        token: str | None,
        results: dict[str, Result],
        deferral: _Deferral | None,
    ) -> list[PollReport]:
        now = self.client.clock.now()
        reports: list[PollReport] = []
        updates: list[dict[str, Any]] = []
        history: list[dict[str, Any]] = []
        ended: list[dict[str, Any]] = []
        try:
            with self.sessions.begin() as session:
                repo = Repository(session)
                for row in repo.claimed(operation_ids, token, lock=True):
                    report, values, entry = self._decide(row, results.get(row.id), deferral, now)
                    reports.append(report)
                    if values is None:
                        continue
                    # Every dict gets every column, so one bulk statement writes them all.
                    updates.append({**row._asdict(), **values})
                    if entry is not None:
                        history.append(entry)
                    if values.get("status") in ENDED_STATES:
                        ended.append(updates[-1])
                repo.update_many(updates)
                repo.insert_history(history)
                for values in ended:
                    for hook in self.on_end:
                        hook(session, values, now)
        except IntegrityError:
            # Only a second writer of the same step can get here; its rows stand.
            log.warning("a poll result was already recorded; this message wrote nothing")
            return [PollReport(i, Outcome.SKIPPED) for i in operation_ids]
        self.last_stats = PollStats(0, len(updates), len(history))
        self._log(reports, results, deferral)
        return reports

    def _decide(
        self,
        row: Row[Any],
        result: Result | None,
        deferral: _Deferral | None,
        now: datetime,
    ) -> tuple[PollReport, dict[str, Any] | None, dict[str, Any] | None]:
        if isinstance(result, Operation):
            values, entry = observation(row, result, now, self.policy)
            outcome = Outcome.CHANGED if entry is not None else Outcome.UNCHANGED
            return PollReport(row.id, outcome, values.get("next_poll_at")), values, entry
        if isinstance(result, OperationNotFound):
            return PollReport(row.id, Outcome.NOT_FOUND), not_found(row, now, str(result)), None
        if isinstance(result, ApiError):
            values = failure(row, result, now, self.policy)
            return (
                PollReport(row.id, Outcome.ERROR, values["next_poll_at"], str(result)),
                values,
                None,
            )
        if deferral is not None:
            values = {"id": row.id, "next_poll_at": deferral.until, "claim_token": None}
            return (
                PollReport(row.id, Outcome.DEFERRED, deferral.until, deferral.reason),
                values,
                None,
            )
        # Not reached by this message (cannot happen without a deferral): the lease expires.
        return PollReport(row.id, Outcome.SKIPPED), None, None

    def _log(
        self,
        reports: Sequence[PollReport],
        results: dict[str, Result],
        deferral: _Deferral | None,
    ) -> None:
        for report in reports:
            result = results.get(report.operation_id)
            if report.outcome is Outcome.CHANGED and isinstance(result, Operation):
                s = result.stats
                log.info(
                    "polled %s: %s total=%d queued=%d created=%d failed=%d",
                    result.id,
                    result.status.value,
                    s.total,
                    s.queued,
                    s.created,
                    s.failed,
                    extra={"operation_id": result.id},
                )
            elif report.outcome is Outcome.NOT_FOUND:
                log.warning(
                    "%s: the API says it does not exist; tracking ended",
                    report.operation_id,
                    extra={"operation_id": report.operation_id},
                )
            elif report.outcome is Outcome.ERROR:
                log.warning(
                    "%s: poll failed (%s); next poll at %s",
                    report.operation_id,
                    report.detail,
                    report.next_poll_at.isoformat() if report.next_poll_at else "-",
                    extra={"operation_id": report.operation_id},
                )
        if deferral is not None:
            deferred = sum(r.outcome is Outcome.DEFERRED for r in reports)
            log.info(
                "account paused until %s (%s); %d poll(s) deferred",
                deferral.until.isoformat(),
                deferral.reason,
                deferred,
            )
