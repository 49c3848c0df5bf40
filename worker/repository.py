"""All queries on tracked operations, their history and the account pause, behind one object."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    Integer,
    Row,
    String,
    any_,
    bindparam,
    cast,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from worker.clock import Clock
from worker.db import (
    ACTIVE_STATES,
    PENDING,
    AccountPause,
    HistoryEntry,
    TrackedOperation,
    UTCDateTime,
)
from worker.gate import LocalGate


@dataclass(frozen=True)
class TrackResult:
    """What ``add`` did: which IDs it started tracking and which were tracked already."""

    added: tuple[str, ...]
    already_tracked: tuple[str, ...]


@dataclass(frozen=True)
class Claim:
    """Operations claimed by one sweep; a poll runs only with the matching token."""

    token: str
    operation_ids: tuple[str, ...]
    # createdAt of each (when it was tracked, for never-fetched ones), in the same order.
    created: tuple[datetime, ...] = ()


INSERT_BATCH = 1000
# What a database that is down, restarting or locked raises (not a bug in a query).
DB_UNREACHABLE = (OperationalError, InterfaceError)
log = logging.getLogger(__name__)


def _pg_array_type(column_type: Any) -> str:
    """The PostgreSQL array type for a column of ``tracked_operations``."""
    if isinstance(column_type, UTCDateTime):
        return "timestamptz[]"
    if isinstance(column_type, Integer):
        return "integer[]"
    return "text[]"


def _insert(session: Session) -> Any:
    """The dialect's INSERT that knows ON CONFLICT."""
    return (postgresql if session.get_bind().dialect.name == "postgresql" else sqlite).insert


class Repository:
    """Queries of one session; the caller owns the transaction."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def add(self, operation_ids: Sequence[str], now: datetime) -> TrackResult:
        """Start tracking the IDs not tracked yet; first poll due at once."""
        wanted = list(dict.fromkeys(operation_ids))
        if not wanted:
            return TrackResult((), ())
        added: set[str] = set()
        # Bound parameters per statement are limited (65,535 on PostgreSQL, 32,766 on SQLite).
        for start in range(0, len(wanted), INSERT_BATCH):
            stmt = (
                _insert(self.session)(TrackedOperation)
                .values(
                    [
                        {
                            "id": op_id,
                            "status": PENDING,
                            "tracked_at": now,
                            "next_poll_at": now,
                            "polls": 0,
                            "consecutive_errors": 0,
                            "version": 1,
                        }
                        for op_id in wanted[start : start + INSERT_BATCH]
                    ]
                )
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(TrackedOperation.id)
            )
            added.update(self.session.scalars(stmt))
        return TrackResult(
            added=tuple(i for i in wanted if i in added),
            already_tracked=tuple(i for i in wanted if i not in added),
        )

    def get(self, operation_id: str) -> TrackedOperation | None:
        """Return one tracked operation or None."""
        return self.session.get(TrackedOperation, operation_id)

    def get_for_update(self, operation_id: str) -> TrackedOperation | None:
        """Return one tracked operation, row-locked where the backend can (PostgreSQL)."""
        stmt = select(TrackedOperation).where(TrackedOperation.id == operation_id)
        return self.session.scalars(stmt.with_for_update()).one_or_none()

    def all(self) -> Sequence[TrackedOperation]:
        """Every tracked operation, the most recently tracked last."""
        stmt = select(TrackedOperation).order_by(TrackedOperation.tracked_at, TrackedOperation.id)
        return self.session.scalars(stmt).all()

    def history(self, operation_id: str) -> Sequence[HistoryEntry]:
        """The stats history of one operation, oldest first."""
        stmt = (
            select(HistoryEntry)
            .where(HistoryEntry.operation_id == operation_id)
            .order_by(HistoryEntry.seq)
        )
        return self.session.scalars(stmt).all()

    def count_due(self, now: datetime) -> int:
        """How many active operations are due for a poll at ``now``."""
        stmt = select(func.count()).where(
            TrackedOperation.status.in_(ACTIVE_STATES), TrackedOperation.next_poll_at <= now
        )
        return int(self.session.scalar(stmt) or 0)

    def claim_due(self, now: datetime, limit: int, lease: timedelta) -> Claim:
        """Claim up to ``limit`` due operations for one sweep, pushing their due time by ``lease``.

        One UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED) RETURNING: on PostgreSQL
        two concurrent sweeps skip each other's rows; on SQLite the statement runs under the
        database's single write lock, so the second sweep sees the rows no longer due.
        A worker that dies leaves its rows due again when the lease runs out. The IDs come back
        in createdAt order (tracked time for never-fetched ones), for List windows.
        """
        token = str(uuid.uuid4())
        due = (
            select(TrackedOperation.id)
            .where(
                TrackedOperation.status.in_(ACTIVE_STATES),
                TrackedOperation.next_poll_at <= now,
            )
            .order_by(TrackedOperation.next_poll_at)
            .limit(limit)
        )
        if self.session.get_bind().dialect.name == "postgresql":
            due = due.with_for_update(skip_locked=True)
        stmt = (
            update(TrackedOperation)
            .where(TrackedOperation.id.in_(due.scalar_subquery()))
            .where(TrackedOperation.next_poll_at <= now)
            .values(next_poll_at=now + lease, claim_token=token)
            .returning(
                TrackedOperation.id,
                func.coalesce(TrackedOperation.remote_created_at, TrackedOperation.tracked_at),
            )
            .execution_options(synchronize_session=False)
        )
        claimed = sorted(self.session.execute(stmt).all(), key=lambda r: (r[1], r[0]))
        return Claim(
            token=token,
            operation_ids=tuple(op_id for op_id, _ in claimed),
            created=tuple(created for _, created in claimed),
        )

    def release(self, operation_ids: Sequence[str], token: str, now: datetime) -> None:
        """Give claimed operations back, due at ``now`` (their poll message was never sent)."""
        stmt = (
            update(TrackedOperation)
            .where(
                TrackedOperation.id.in_(list(operation_ids)),
                TrackedOperation.claim_token == token,
            )
            .values(next_poll_at=now, claim_token=None)
            .execution_options(synchronize_session=False)
        )
        self.session.execute(stmt)

    def claimed(
        self, operation_ids: Sequence[str], token: str | None, *, lock: bool = False
    ) -> Sequence[Row[Any]]:
        """State of the active rows among ``operation_ids`` still claimed with ``token``
        (None: any claim), as light Core rows with the columns of ``tracked_operations``.

        With ``lock``, rows are locked for the transaction where the backend can (PostgreSQL),
        so a duplicated message waits, then finds the claim gone.
        """
        table = TrackedOperation.__table__
        ids = list(operation_ids)
        if self.session.get_bind().dialect.name == "postgresql":
            # One array parameter instead of thousands: = ANY(:ids) binds in microseconds.
            wanted = table.c.id == any_(cast(ids, postgresql.ARRAY(String)))
        else:
            wanted = table.c.id.in_(ids)
        stmt = select(table).where(wanted, table.c.status.in_(ACTIVE_STATES))
        if token is not None:
            stmt = stmt.where(table.c.claim_token == token)
        if lock:
            stmt = stmt.with_for_update()
        return self.session.execute(stmt.order_by(table.c.id)).all()

    def update_many(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk UPDATE by primary key; every dict holds ``id`` and the same other columns.

        PostgreSQL gets one ``UPDATE ... FROM (VALUES ...)`` per batch; elsewhere executemany.
        """
        if not rows:
            return
        table = TrackedOperation.__table__.c
        if self.session.get_bind().dialect.name != "postgresql":
            stmt = (
                update(TrackedOperation)
                .where(TrackedOperation.id == bindparam("_id"))
                .values({k: bindparam(k) for k in rows[0] if k != "id"})
                .execution_options(synchronize_session=False)
            )
            self.session.connection().execute(stmt, [{**r, "_id": r["id"]} for r in rows])
            return
        # One statement, one array per column: no per-row statements and no huge SQL text.
        names = [n for n in rows[0] if n != "id"]
        arrays = ", ".join(f"CAST(:{n} AS {_pg_array_type(table[n].type)})" for n in ["id", *names])
        sql = (
            "UPDATE tracked_operations AS t SET "
            + ", ".join(f"{n} = v.{n}" for n in names)
            + f" FROM unnest({arrays}) AS v(id, {', '.join(names)}) WHERE t.id = v.id"
        )
        self.session.execute(text(sql), {n: [r[n] for r in rows] for n in ["id", *names]})

    def insert_history(self, rows: Sequence[dict[str, Any]]) -> None:
        """Bulk INSERT of history rows (the unique (operation_id, seq) stops duplicates)."""
        if rows:
            self.session.execute(insert(HistoryEntry), list(rows))


class DbGate:
    """The account pause kept in the database, so every process on every machine honors it.

    The row also counts the account's throttles in a row (``consecutive_throttles``), so a
    storm of ``Retry-After: 0`` grows the wait for every process. If the database cannot be
    reached, the pause is still honored by this process (an in-process gate inside this one),
    logged, and written as soon as the database answers again: a 429 is never forgotten.
    """

    def __init__(self, engine: Engine, account_sid: str, clock: Clock) -> None:
        self._sessions = sessionmaker(engine)
        self.account_sid = account_sid
        self.clock = clock
        self._local = LocalGate()
        self._pending: tuple[datetime, str, int] | None = None  # a pause not written yet
        self._throttles_seen = 0  # the row's count at the last read or write
        self._down = False

    def paused_until(self, now: datetime) -> tuple[datetime, str] | None:
        """Return (until, reason) while the account is paused (here or for every process)."""
        local = self._local.paused_until(now)
        try:
            with self._sessions() as session:
                row = session.get(AccountPause, self.account_sid)
                found = None if row is None else (row.paused_until, row.reason)
                self._throttles_seen = 0 if row is None else row.consecutive_throttles
            self._flush_pending(now)
        except DB_UNREACHABLE as exc:
            self._unreachable("read", exc)
            return local
        self._reachable()
        shared = found if found is not None and found[0] > now else None
        if local is not None and (shared is None or local[0] > shared[0]):
            return local
        return shared

    def pause(self, until: datetime, reason: str, status: int) -> None:
        """Record the pause at once, in its own transaction, keeping a later existing one."""
        self._local.pause(until, reason, status)
        try:
            self._write_pause(until, reason, status)
        except DB_UNREACHABLE as exc:
            if self._pending is None or until > self._pending[0]:
                self._pending = (until, reason, status)
            self._unreachable("write", exc)
            log.warning(
                "account pause until %s kept in this process only until the database answers",
                until.isoformat(),
            )
            return
        self._reachable()

    def count_throttle(self, now: datetime, status: int) -> int:
        """Count one more 409/429/503 in a row in the account's row; return the count."""
        try:
            with self._sessions.begin() as session:
                insert = _insert(session)
                stmt = insert(AccountPause).values(
                    account_sid=self.account_sid,
                    paused_until=now,
                    reason=f"HTTP {status}",
                    status_code=status,
                    updated_at=now,
                    consecutive_throttles=1,
                )
                stmt = stmt.on_conflict_do_update(
                    index_elements=["account_sid"],
                    set_={"consecutive_throttles": AccountPause.consecutive_throttles + 1},
                ).returning(AccountPause.consecutive_throttles)
                count = int(session.execute(stmt).scalar_one())
        except DB_UNREACHABLE as exc:
            self._unreachable("count a throttle in", exc)
            self._throttles_seen += 1  # this process's own count goes on meanwhile
            return self._throttles_seen
        self._reachable()
        self._throttles_seen = count
        return count

    def reset_throttles(self) -> None:
        """Set the count back to 0 after a 200 (a write only when a count was seen)."""
        if self._throttles_seen == 0:
            return
        self._throttles_seen = 0
        try:
            with self._sessions.begin() as session:
                session.execute(
                    update(AccountPause)
                    .where(
                        AccountPause.account_sid == self.account_sid,
                        AccountPause.consecutive_throttles > 0,
                    )
                    .values(consecutive_throttles=0)
                    .execution_options(synchronize_session=False)
                )
        except DB_UNREACHABLE as exc:
            self._unreachable("reset the throttles in", exc)

    def current(self) -> AccountPause | None:
        """The last recorded pause, running or not (for `optrack status`)."""
        with self._sessions() as session:
            return session.get(AccountPause, self.account_sid)

    def _write_pause(self, until: datetime, reason: str, status: int) -> None:
        with self._sessions.begin() as session:
            insert = _insert(session)
            stmt = insert(AccountPause).values(
                account_sid=self.account_sid,
                paused_until=until,
                reason=reason,
                status_code=status,
                updated_at=self.clock.now(),
            )
            stmt = stmt.on_conflict_do_update(
                index_elements=["account_sid"],
                set_={
                    "paused_until": stmt.excluded.paused_until,
                    "reason": stmt.excluded.reason,
                    "status_code": stmt.excluded.status_code,
                    "updated_at": stmt.excluded.updated_at,
                },
                where=AccountPause.paused_until < stmt.excluded.paused_until,
            )
            session.execute(stmt)

    def _flush_pending(self, now: datetime) -> None:
        """Write the pause recorded while the database was unreachable, if it still runs."""
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] > now:
            try:
                self._write_pause(*pending)
            except DB_UNREACHABLE:
                self._pending = pending
                raise
            log.info("account pause until %s written to the database", pending[0].isoformat())

    def _unreachable(self, what: str, exc: Exception) -> None:
        if not self._down:
            log.warning(
                "could not %s the account pause in the database (%s); this process honors "
                "its own pauses meanwhile",
                what,
                type(exc).__name__,
            )
        self._down = True

    def _reachable(self) -> None:
        if self._down:
            log.info("the account pause's database answers again")
        self._down = False
