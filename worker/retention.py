"""Retention: drop the history of operations that ended long ago, in short transactions.

Each operation keeps its ``tracked_operations`` row (its final state) and its last history row;
only the steps before that go. Deleted notices are the delivered ones of the same operations,
and (``prune_delivered_notices``) every notice delivered before its own cutoff, so the outbox
holds what is pending and a bounded tail of what went out. Each batch is its own transaction,
so no lock is held for long.

A prune walks forward with a cursor, in the order of an index that already exists: history in
``(operation_id, seq)`` order (its unique constraint), notices in ``operation_id`` order (theirs),
from the lowest to the highest ID of an operation ended before the cutoff. Each batch reads the
next ``batch_size`` entries after the cursor, looks their operations up by primary key, deletes
what may go by primary key and moves the cursor past what it read. Every statement is an index
range or key lookup whatever the planner's statistics say, so each batch costs the same from the
first to the last; before, each batch re-read every operation the batches before it had
already pruned, and batch times grew with the run (docs/operations.md has both measurements).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, delete, func, literal, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from worker.db import HistoryEntry, Notice, TrackedOperation
from worker.tracking import ENDED_STATES

log = logging.getLogger(__name__)
DEFAULT_BATCH = 5000
# Ids per DELETE statement: below every backend's limit on bound parameters.
_DELETE_CHUNK = 900

Kind = Literal["history", "notices"]
OnBatch = Callable[[Kind, int], None]


@dataclass(frozen=True)
class PruneResult:
    """What one prune removed."""

    cutoff: datetime
    history_rows: int
    notices: int
    batches: int  # transactions that deleted something

    def summary(self) -> str:
        """One line for humans and logs."""
        return (
            f"pruned {self.history_rows} history row(s) and {self.notices} delivered notice(s) "
            f"of operations ended before {self.cutoff.isoformat()} in {self.batches} batch(es)"
        )


def _ended_before(cutoff: datetime) -> ColumnElement[bool]:
    return TrackedOperation.status.in_(ENDED_STATES) & (TrackedOperation.ended_at < cutoff)


def _bounds(sessions: sessionmaker[Session], cutoff: datetime) -> tuple[str, str] | None:
    """The lowest and highest ID of an operation ended before ``cutoff``: where walks run."""
    with sessions() as session:
        low, high = session.execute(
            select(func.min(TrackedOperation.id), func.max(TrackedOperation.id)).where(
                _ended_before(cutoff)
            )
        ).one()
    return None if low is None else (low, high)


def _prunable(session: Session, cutoff: datetime, first: str, last: str) -> set[str]:
    """Operations between ``first`` and ``last`` (IDs) that ended before ``cutoff``.

    Only the primary key is in the WHERE clause, so this is a key range scan on any planner;
    the status and end are checked here.
    """
    rows = session.execute(
        select(TrackedOperation.id, TrackedOperation.status, TrackedOperation.ended_at).where(
            TrackedOperation.id >= first, TrackedOperation.id <= last
        )
    )
    return {
        op
        for op, status, ended_at in rows
        if status in ENDED_STATES and ended_at is not None and ended_at < cutoff
    }


def _delete_ids(
    session: Session, model: type[HistoryEntry] | type[Notice], ids: Sequence[int]
) -> None:
    """Delete rows by primary key, a bounded number of ids per statement."""
    for start in range(0, len(ids), _DELETE_CHUNK):
        stmt = delete(model).where(model.id.in_(ids[start : start + _DELETE_CHUNK]))
        session.execute(stmt.execution_options(synchronize_session=False))


def _history_window(
    session: Session,
    cutoff: datetime,
    bounds: tuple[str, str],
    after: tuple[str, int] | None,
    size: int,
) -> tuple[int, tuple[str, int] | None]:
    """Delete old rows among the next ``size`` history entries; (deleted, next cursor or None)."""
    query = (
        select(HistoryEntry.id, HistoryEntry.operation_id, HistoryEntry.seq)
        .where(HistoryEntry.operation_id.between(*bounds))
        .order_by(HistoryEntry.operation_id, HistoryEntry.seq)
        .limit(size)
    )
    if after is not None:
        # A row-value comparison: both backends start the index walk right at the cursor.
        query = query.where(
            tuple_(HistoryEntry.operation_id, HistoryEntry.seq)
            > tuple_(literal(after[0]), literal(after[1]))
        )
    window = session.execute(query).all()
    if not window:
        return 0, None
    last_seq: dict[str, int] = {}
    for _id, op, seq in window:
        last_seq[op] = seq  # in (operation_id, seq) order: the last one seen is the highest
    final_op = window[-1][1]
    if len(window) == size:  # the window's last operation may go on past it
        last_seq[final_op] = (
            session.scalar(
                select(func.max(HistoryEntry.seq)).where(HistoryEntry.operation_id == final_op)
            )
            or last_seq[final_op]
        )
    prunable = _prunable(session, cutoff, window[0][1], final_op)
    victims = [i for i, op, seq in window if op in prunable and seq < last_seq[op]]
    _delete_ids(session, HistoryEntry, victims)
    cursor = (final_op, window[-1][2])
    return len(victims), cursor if len(window) == size else None


def _notice_window(
    session: Session, cutoff: datetime, bounds: tuple[str, str], after: str | None, size: int
) -> tuple[int, str | None]:
    """Delete the delivered ones among the next ``size`` notices; (deleted, next cursor)."""
    query = (
        select(Notice.id, Notice.operation_id, Notice.delivered_at)
        .where(Notice.operation_id.between(*bounds))
        .order_by(Notice.operation_id)
        .limit(size)
    )
    if after is not None:
        query = query.where(Notice.operation_id > after)
    window = session.execute(query).all()
    if not window:
        return 0, None
    prunable = _prunable(session, cutoff, window[0][1], window[-1][1])
    victims = [i for i, op, delivered in window if delivered is not None and op in prunable]
    _delete_ids(session, Notice, victims)
    return len(victims), window[-1][1] if len(window) == size else None


def _walk(
    sessions: sessionmaker[Session],
    kind: Kind,
    step: Callable[[Session, Any], tuple[int, Any]],
    on_batch: OnBatch | None,
) -> tuple[int, int]:
    """Run ``step`` batch by batch, each in its own transaction, until it returns no cursor."""
    total = batches = 0
    cursor: Any = None
    while True:
        with sessions.begin() as session:
            deleted, cursor = step(session, cursor)
        if deleted:
            batches += 1
            total += deleted
            log.info("prune: %d %s row(s) deleted in one batch", deleted, kind)
        if on_batch is not None:
            on_batch(kind, deleted)
        if cursor is None:
            return total, batches


def _delivered_window(
    session: Session, before: datetime, after: datetime | None, size: int
) -> tuple[int, datetime | None]:
    """Delete the next ``size`` notices delivered before ``before``, in ``delivered_at`` order
    (its index); (deleted, next cursor or None). All read go, so the cursor only skips the
    index entries of what earlier batches deleted."""
    query = (
        select(Notice.id, Notice.delivered_at)
        .where(Notice.delivered_at < before)
        .order_by(Notice.delivered_at)
        .limit(size)
    )
    if after is not None:
        query = query.where(Notice.delivered_at >= after)
    window = session.execute(query).all()
    _delete_ids(session, Notice, [notice_id for notice_id, _ in window])
    return len(window), window[-1][1] if len(window) == size else None


def prune_delivered_notices(
    sessions: sessionmaker[Session],
    before: datetime,
    batch_size: int = DEFAULT_BATCH,
    on_batch: OnBatch | None = None,
) -> int:
    """Delete every notice delivered before ``before``, ``batch_size`` per transaction; return
    how many. Pending notices stay, however old (they are still owed)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    deleted, _ = _walk(
        sessions,
        "notices",
        lambda s, after: _delivered_window(s, before, after, batch_size),
        on_batch,
    )
    log.info("pruned %d notice(s) delivered before %s", deleted, before.isoformat())
    return deleted


def prune(
    sessions: sessionmaker[Session],
    cutoff: datetime,
    batch_size: int = DEFAULT_BATCH,
    on_batch: OnBatch | None = None,
) -> PruneResult:
    """Delete old history (all but each operation's last row) and delivered notices.

    Each transaction reads at most ``batch_size`` history rows (or notices) and deletes those
    of them that may go. ``on_batch(kind, deleted)`` is called after each one commits.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bounds = _bounds(sessions, cutoff)
    history = notices = batches = 0
    if bounds is not None:
        history, history_batches = _walk(
            sessions,
            "history",
            lambda s, after: _history_window(s, cutoff, bounds, after, batch_size),
            on_batch,
        )
        notices, notice_batches = _walk(
            sessions,
            "notices",
            lambda s, after: _notice_window(s, cutoff, bounds, after, batch_size),
            on_batch,
        )
        batches = history_batches + notice_batches
    result = PruneResult(cutoff, history, notices, batches)
    log.info("%s", result.summary())
    return result
