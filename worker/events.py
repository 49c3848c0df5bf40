"""The change feed: every recorded change (a history row) and end (a notice), in order, with an
id that resumes it. ``GET /api/v1/events`` streams it.

An event's id is ``H-N``: the ``operation_history.id`` and the ``notices.id`` up to which the
feed has gone. Neither part ever decreases, so an id names a point in the feed, and every event
after it is the one with a history row above H or a notice above N. A change is a history row
(COMPLETED and CANCELED ends have one too); an end is a notice, written with every end,
NOT_FOUND included (``notices.record_end``), carrying the final record.

Commit order: on PostgreSQL an id is taken when a row is inserted, not when it commits, so a
row with a lower id can become visible after a higher one. A feed that moved past it would
lose it for good. So a feed holds at a gap in the ids for up to ``HOLD`` (the transaction that
took the id commits, or rolled back and the id is never used), unless the row after the gap
is older than ``SETTLED`` (rows pruned by retention, a rollback long ago). SQLite writes one
transaction at a time, so its ids appear in order.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from worker.clock import Clock
from worker.db import HistoryEntry, Notice, TrackedOperation
from worker.records import iso
from worker.reports import one_snapshot
from worker.reports.queries import AccountScope, of_accounts

HOLD = timedelta(seconds=5)
SETTLED = timedelta(minutes=10)
BATCH = 500  # rows of each table read at a time
LOOK_INTERVAL = 0.5  # seconds between reads while nothing happens
HEARTBEAT = 15.0  # seconds of quiet before a heartbeat, so proxies keep the stream open
_CURSOR = re.compile(r"([0-9]{1,19})-([0-9]{1,19})")
_MAX_ID = 2**63 - 1

Kind = Literal["change", "end"]


class BadEventId(ValueError):
    """Raised when a Last-Event-ID is not an id this feed sent."""


@dataclass(frozen=True, order=True)
class Cursor:
    """A point in the feed: the last history row id and notice id passed."""

    history: int = 0
    notice: int = 0

    def text(self) -> str:
        """The event id: ``H-N``."""
        return f"{self.history}-{self.notice}"

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """An event id as sent; BadEventId otherwise."""
        match = _CURSOR.fullmatch(text.strip())
        if match is None or max(int(match[1]), int(match[2])) > _MAX_ID:
            raise BadEventId(f"{text[:40]!r} is not an event id of this stream (such as 1234-56)")
        return cls(int(match[1]), int(match[2]))


@dataclass(frozen=True)
class Event:
    """One change or end; ``cursor`` is its id."""

    kind: Kind
    cursor: Cursor
    operation_id: str
    data: dict[str, Any]


def head(session: Session) -> Cursor:
    """The feed's end now: a stream that starts here sends only what comes next."""
    history = session.scalar(select(func.max(HistoryEntry.id))) or 0
    notice = session.scalar(select(func.max(Notice.id))) or 0
    return Cursor(history, notice)


def passable(
    after: int,
    rows: Sequence[tuple[int, datetime]],
    gaps: dict[int, datetime],
    now: datetime,
    hold: timedelta = HOLD,
    settled: timedelta = SETTLED,
) -> int:
    """How many of ``rows`` (id and time written, in id order, all above ``after``) may be sent
    at ``now``: up to the first gap in the ids first seen less than ``hold`` ago, unless the row
    after it is ``settled``. ``gaps`` (gap's first id -> first seen) is kept by the caller."""
    expected = after + 1
    count = 0
    blocked = False
    for row_id, written_at in rows:
        if row_id > expected and now - written_at < settled:
            first_seen = gaps.setdefault(expected, now)  # every gap ages from its first sight
            blocked = blocked or now - first_seen < hold
        if not blocked:
            count += 1
        expected = row_id + 1
    passed = rows[count - 1][0] if count else after
    for start in [s for s in gaps if s <= passed]:  # passed: filled, or given up on
        del gaps[start]
    return count


def _change(row: HistoryEntry) -> dict[str, Any]:
    return {
        "id": row.operation_id,
        "seq": row.seq,
        "status": row.status,
        "total": row.total,
        "queued": row.queued,
        "created": row.created,
        "failed": row.failed,
        "observed_at": iso(row.observed_at),
        "remote_updated_at": iso(row.remote_updated_at),
    }


@dataclass
class Feed:
    """One stream's place in the feed; ``ids`` (if given) keeps only those operations, and
    ``accounts`` (if given) only the operations of that account or those accounts."""

    cursor: Cursor
    ids: frozenset[str] | None = None
    accounts: AccountScope = None
    hold: timedelta = HOLD
    settled: timedelta = SETTLED
    batch: int = BATCH
    history_gaps: dict[int, datetime] = field(default_factory=dict)
    notice_gaps: dict[int, datetime] = field(default_factory=dict)

    def _wanted(self, operation_id: str) -> bool:
        return self.ids is None or operation_id in self.ids

    def _of_accounts(self, session: Session, operation_ids: set[str]) -> frozenset[str] | None:
        """Of ``operation_ids``, those of ``accounts``; None: no account filter."""
        if self.accounts is None or not operation_ids:
            return None
        stmt = select(TrackedOperation.id).where(
            TrackedOperation.id.in_(sorted(operation_ids)), of_accounts(self.accounts)
        )
        return frozenset(session.scalars(stmt))

    def read(self, session: Session, now: datetime) -> list[Event]:
        """The events after the cursor that may be sent at ``now``, in order; moves on."""
        one_snapshot(session)  # a change and the end written with it are seen together
        changes = session.scalars(
            select(HistoryEntry)
            .where(HistoryEntry.id > self.cursor.history)
            .order_by(HistoryEntry.id)
            .limit(self.batch)
        ).all()
        ends = session.scalars(
            select(Notice)
            .where(Notice.id > self.cursor.notice)
            .order_by(Notice.id)
            .limit(self.batch)
        ).all()
        take = passable(
            self.cursor.history,
            [(r.id, r.observed_at) for r in changes],
            self.history_gaps,
            now,
            self.hold,
            self.settled,
        )
        events: list[Event] = []
        kept = self._of_accounts(
            session, {r.operation_id for r in changes} | {n.operation_id for n in ends}
        )
        for row in changes[:take]:
            self.cursor = Cursor(row.id, self.cursor.notice)
            if self._wanted(row.operation_id) and (kept is None or row.operation_id in kept):
                events.append(Event("change", self.cursor, row.operation_id, _change(row)))
        take = passable(
            self.cursor.notice,
            [(r.id, r.created_at) for r in ends],
            self.notice_gaps,
            now,
            self.hold,
            self.settled,
        )
        for notice in ends[:take]:
            self.cursor = Cursor(self.cursor.history, notice.id)
            if self._wanted(notice.operation_id) and (kept is None or notice.operation_id in kept):
                record = json.loads(notice.payload)
                events.append(Event("end", self.cursor, notice.operation_id, record))
        return events


async def follow(
    sessions: sessionmaker[Session],
    feed: Feed,
    clock: Clock,
    *,
    interval: float = LOOK_INTERVAL,
    heartbeat: float = HEARTBEAT,
) -> AsyncIterator[Event | None]:
    """The feed's events as they are recorded, for ever; None when ``heartbeat`` seconds
    passed without one. Each read runs in a worker thread and its own short transaction, and
    the waits between are async sleeps: a stream holds no thread and no connection."""

    def look() -> list[Event]:
        with sessions() as session:
            return feed.read(session, clock.now())

    quiet_since = clock.now()
    while True:
        events = await asyncio.to_thread(look)
        for event in events:
            yield event
        now = clock.now()
        if events:
            quiet_since = now
        elif (now - quiet_since).total_seconds() >= heartbeat:
            yield None
            quiet_since = now
        await asyncio.sleep(interval)
