"""Records what the API said about tracked operations: only what is new, each change once.

Used for every answer, whoever asked: a poll group's pages and GETs, discovery's listing.
Each call is one transaction. The rows are read, the changes decided, then the changed rows
are locked (in id order) and decided again, so two writers that saw one change record it
once and neither waits on rows that did not change.

A transaction the database refuses for any reason but being unreachable (a value it cannot
store, a constraint) is written again in halves, down to the one answer it refuses, which is
recorded as ``UnstorableAnswer``: that operation backs off, the others are recorded. An
unreachable database is the caller's to wait out (``poller``): nothing is split for it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row
from sqlalchemy.orm import Session, sessionmaker

from worker.db import DB_REFUSED, DB_UNREACHABLE
from worker.errors import ApiError, OperationNotFound, UnstorableAnswer, storable_text
from worker.operation import Operation
from worker.repository import Repository
from worker.tracking import (
    Change,
    Decision,
    Failed,
    Gone,
    Observed,
    Outcome,
    PollPolicy,
    Stale,
    failure,
    not_found,
    observe,
)

log = logging.getLogger(__name__)
Result = Operation | ApiError
# Called inside the write transaction for every operation that reached an end.
EndHook = Callable[[Session, str, datetime], None]


@dataclass(frozen=True)
class Recorded:
    """What one ``record`` call found and wrote."""

    outcomes: dict[str, Outcome]  # per tracked, active operation among the results
    leaving: frozenset[str]  # operations that ended or must be placed again
    rows: int
    history: int

    @property
    def changed(self) -> bool:
        """True if any row was written."""
        return self.rows > 0

    def __add__(self, other: Recorded) -> Recorded:
        return Recorded(
            {**self.outcomes, **other.outcomes},
            self.leaving | other.leaving,
            self.rows + other.rows,
            self.history + other.history,
        )


NOTHING = Recorded({}, frozenset(), 0, 0)


class Recorder:
    """Writes answers about tracked operations (see the module docstring)."""

    def __init__(
        self, sessions: sessionmaker[Session], policy: PollPolicy, on_end: Sequence[EndHook] = ()
    ) -> None:
        self.sessions = sessions
        self.policy = policy
        self.on_end = list(on_end)

    def record(
        self, results: Mapping[str, Result], now: datetime, account: str | None = None
    ) -> Recorded:
        """Write what ``results`` say about the tracked, active operations among them (with
        ``account``: only that account's, whose credentials got the answers); an answer the
        database refuses costs only its own operation (module docstring)."""
        if not results:
            return NOTHING
        try:
            return self._record(results, now, account)
        except DB_UNREACHABLE:
            raise
        except DB_REFUSED as exc:
            if len(results) > 1:
                items = list(results.items())
                half = len(items) // 2
                log.info(
                    "the database refused a write of %d answers (%s); written again in halves",
                    len(items),
                    type(exc).__name__,
                )
                first, second = dict(items[:half]), dict(items[half:])
                return self.record(first, now, account) + self.record(second, now, account)
            [(op_id, result)] = results.items()
            return self._refused(op_id, result, exc, now)

    def _refused(self, op_id: str, result: Result, exc: Exception, now: datetime) -> Recorded:
        """Back the operation off in place of the answer the database refused."""
        first_line = str(exc).partition("\n")[0]  # SQLAlchemy appends the SQL and its values
        reason = storable_text(f"{type(exc).__name__}: {first_line}", 200)
        extra = {"operation_id": op_id}
        if isinstance(result, UnstorableAnswer):  # its fixed text refused too: a constraint
            log.error(
                "%s: the database refused even its backoff (%s); asked again with its group",
                op_id,
                reason,
                extra=extra,
            )
            return NOTHING
        log.error(
            "%s: the database refused its answer (%s); it backs off", op_id, reason, extra=extra
        )
        unstorable = UnstorableAnswer(f"the database refused the answer ({reason})")
        return self.record({op_id: unstorable}, now)

    def _record(
        self, results: Mapping[str, Result], now: datetime, account: str | None = None
    ) -> Recorded:
        with self.sessions.begin() as session:
            repo = Repository(session)
            stored = repo.states(results, account=account)
            decided = _decide(stored, results, now, self.policy)
            if decided:
                # Decide again on the locked rows: another writer may have been first.
                locked = repo.states((c.known.id for c in decided), lock=True)
                decided = _decide(locked, results, now, self.policy)
            written = repo.apply([c for c in decided if not isinstance(c, Stale)], now)
            for op_id in written.ended:
                for hook in self.on_end:
                    hook(session, op_id, now)
        outcomes = {row.id: _unchanged(results[row.id]) for row in stored}
        outcomes.update({c.known.id: _outcome(c) for c in decided})
        _log(decided)
        leaving = frozenset(
            c.known.id for c in decided if not isinstance(c, Stale) and _leaves_group(c)
        )
        return Recorded(outcomes, leaving, written.rows, written.history)


def _decide(
    stored: Sequence[Row[Any]], results: Mapping[str, Result], now: datetime, policy: PollPolicy
) -> list[Decision]:
    """The changes ``results`` make to the stored rows, and the stale answers among them."""
    changes: list[Decision] = []
    for row in stored:
        result = results[row.id]
        if isinstance(result, Operation):
            observed = observe(row, result, now, policy)
            if observed is not None:
                changes.append(observed)
        elif isinstance(result, OperationNotFound):
            changes.append(not_found(row, str(result), now, policy))
        else:
            changes.append(failure(row, result, now, policy))
    return changes


def _unchanged(result: Result) -> Outcome:
    return Outcome.ERROR if isinstance(result, ApiError) else Outcome.UNCHANGED


def _outcome(change: Decision) -> Outcome:
    if isinstance(change, Stale):
        return Outcome.STALE
    if isinstance(change, Observed):
        return Outcome.CHANGED if change.history else Outcome.UNCHANGED
    return Outcome.ERROR if isinstance(change, Failed) else Outcome.NOT_FOUND


def _leaves_group(change: Change) -> bool:
    """An end leaves its group; a first sight is placed again by its createdAt."""
    if isinstance(change, Observed):
        return change.ended or change.first_sight
    return isinstance(change, Gone)


def _log(changes: Sequence[Decision]) -> None:
    for change in changes:
        op_id = change.known.id
        extra = {"operation_id": op_id}
        if isinstance(change, Stale):
            # A page read before another message's write is older and common: info only.
            log.log(
                logging.WARNING if change.lowers else logging.INFO,
                "%s: stale answer not recorded (%s): %s updatedAt=%s",
                op_id,
                change.reason,
                change.answer.status.value,
                change.answer.updated_at.isoformat(),
                extra=extra,
            )
            continue
        if isinstance(change, Observed):
            if not change.trusted:
                log.warning(
                    "%s: updatedAt %s runs ahead of the answer's Date and the local clock by "
                    "more than OPTRACK_CLOCK_ALLOWANCE; not used to order answers",
                    op_id,
                    change.answer.updated_at.isoformat(),
                    extra=extra,
                )
            if change.history:
                s = change.answer.stats
                log.info(
                    "polled %s: %s total=%d queued=%d created=%d failed=%d",
                    op_id,
                    change.answer.status.value,
                    s.total,
                    s.queued,
                    s.created,
                    s.failed,
                    extra=extra,
                )
        elif isinstance(change, Gone):
            log.warning("%s: the API says it does not exist; tracking ended", op_id, extra=extra)
        elif change.not_found_since is not None and change.error.startswith("HTTP 404"):
            log.warning(
                "%s: the API says it does not exist (since %s); asked again at %s, tracking "
                "ends if it lasts OPTRACK_NOT_FOUND_GRACE",
                op_id,
                change.not_found_since.isoformat(),
                change.not_before.isoformat(),
                extra=extra,
            )
        else:
            log.warning(
                "%s: poll failed (%s); not before %s",
                op_id,
                change.error,
                change.not_before.isoformat(),
                extra=extra,
            )
