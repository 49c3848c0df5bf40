"""Retention: drop the history of operations that ended long ago, in short transactions.

Each operation keeps its ``tracked_operations`` row (its final state) and its last history row;
only the steps before that go. Deleted notices are the delivered ones of the same operations.
Each batch is its own transaction, so no lock is held for long.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Delete, Select, delete, func, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from worker.db import ENDED_STATES, HistoryEntry, Notice, TrackedOperation

log = logging.getLogger(__name__)
DEFAULT_BATCH = 5000


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


def _ended_before(cutoff: datetime) -> Select[str]:
    return select(TrackedOperation.id).where(
        TrackedOperation.status.in_(ENDED_STATES), TrackedOperation.ended_at < cutoff
    )


def _history_batch(cutoff: datetime, size: int) -> Delete:
    later = aliased(HistoryEntry)
    last_seq = (
        select(func.max(later.seq)).where(later.operation_id == HistoryEntry.operation_id)
    ).scalar_subquery()
    victims = (
        select(HistoryEntry.id)
        .where(HistoryEntry.operation_id.in_(_ended_before(cutoff)))
        .where(HistoryEntry.seq < last_seq)
        .limit(size)
    )
    return delete(HistoryEntry).where(HistoryEntry.id.in_(victims.scalar_subquery()))


def _notice_batch(cutoff: datetime, size: int) -> Delete:
    victims = (
        select(Notice.id)
        .where(Notice.delivered_at.is_not(None))
        .where(Notice.operation_id.in_(_ended_before(cutoff)))
        .limit(size)
    )
    return delete(Notice).where(Notice.id.in_(victims.scalar_subquery()))


def prune(
    sessions: sessionmaker[Session], cutoff: datetime, batch_size: int = DEFAULT_BATCH
) -> PruneResult:
    """Delete old history (all but each operation's last row) and delivered notices."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    totals = {"history": 0, "notices": 0}
    batches = 0
    for kind, build in (("history", _history_batch), ("notices", _notice_batch)):
        while True:
            with sessions.begin() as session:
                stmt = build(cutoff, batch_size).execution_options(synchronize_session=False)
                deleted = int(session.execute(stmt).rowcount)  # type: ignore[attr-defined]
            if deleted == 0:
                break
            batches += 1
            totals[kind] += deleted
            log.info("prune: %d %s row(s) deleted in one batch", deleted, kind)
            if deleted < batch_size:
                break
    result = PruneResult(cutoff, totals["history"], totals["notices"], batches)
    log.info("%s", result.summary())
    return result
