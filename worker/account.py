"""The account's shared state in the database: the pause every process honors (``DbGate``)
and the request budget every worker shares (``DbBudget``).

Each keeps its own short transactions on its own sessions, apart from the callers' units of
work: a pause is written the moment a 409/429/503 arrives, whatever the poll around it does.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import Engine, select, update
from sqlalchemy.orm import sessionmaker

from worker import dialect
from worker.clock import Clock
from worker.db import DB_UNREACHABLE, AccountPause, RequestBudget
from worker.errors import AUTH_STATUSES, RetryLater
from worker.gate import LocalGate

log = logging.getLogger(__name__)
_Pause = tuple[datetime, str, int, datetime]  # until, reason, status, when it was recorded


class DbGate:
    """The account pause kept in the database, so every process on every machine honors it.

    The row also counts the account's throttles in a row (``consecutive_throttles``), so a
    storm of ``Retry-After: 0`` grows the wait for every process, and keeps the last 401/403
    (``credentials_rejected_at``, ``credentials_error``) apart from the pause: a longer pause
    for a 429 neither drops nor overwrites it; a 200 to a request sent after it clears it.
    If the database cannot be
    reached, the pause is still honored by this process (an in-process gate inside this one),
    logged, and written as soon as the database answers again: a 429 is never forgotten.
    """

    def __init__(self, engine: Engine, account_sid: str, clock: Clock) -> None:
        self._sessions = sessionmaker(engine)
        self.account_sid = account_sid
        self.clock = clock
        self._local = LocalGate()
        # A pause not written yet (until, reason, status, when), and a 401/403's, apart: the
        # later pause is kept, but a rejection of the credentials is written even once it ran out.
        self._pending: _Pause | None = None
        self._pending_rejection: _Pause | None = None
        self._throttles_seen = 0  # the row's count at the last read or write
        self._rejection_seen = False  # the row held a credentials rejection at the last read
        self._down = False

    def paused_until(self, now: datetime) -> tuple[datetime, str] | None:
        """Return (until, reason) while the account is paused (here or for every process)."""
        local = self._local.paused_until(now)
        try:
            with self._sessions() as session:
                row = session.get(AccountPause, self.account_sid)
                found = None if row is None else (row.paused_until, row.reason)
                self._throttles_seen = 0 if row is None else row.consecutive_throttles
                self._rejection_seen = row is not None and row.credentials_rejected_at is not None
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
        """Record the pause at once, in its own transaction, keeping a later existing one; a
        401/403 is recorded as a rejection of the credentials whatever pause runs."""
        self._local.pause(until, reason, status)
        now = self.clock.now()
        try:
            self._write_pause(until, reason, status, now)
        except DB_UNREACHABLE as exc:
            if self._pending is None or until > self._pending[0]:
                self._pending = (until, reason, status, now)
            if status in AUTH_STATUSES:
                self._pending_rejection = (until, reason, status, now)
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
                insert = dialect.insert(session)
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

    def answered_ok(self, sent_at: datetime) -> None:
        """After a 200 to a request sent at ``sent_at``: the throttle count back to 0, and a
        rejection of the credentials recorded before ``sent_at`` cleared (a write only when the
        last read saw either)."""
        if self._throttles_seen == 0 and not self._rejection_seen:
            return
        self._throttles_seen = 0
        self._rejection_seen = False
        mine = AccountPause.account_sid == self.account_sid
        try:
            with self._sessions.begin() as session:
                session.execute(
                    update(AccountPause)
                    .where(mine, AccountPause.consecutive_throttles > 0)
                    .values(consecutive_throttles=0)
                    .execution_options(synchronize_session=False)
                )
                session.execute(
                    update(AccountPause)
                    .where(mine, AccountPause.credentials_rejected_at <= sent_at)
                    .values(credentials_rejected_at=None, credentials_error=None)
                    .execution_options(synchronize_session=False)
                )
        except DB_UNREACHABLE as exc:
            self._unreachable("reset the throttles in", exc)

    def current(self) -> AccountPause | None:
        """The last recorded pause, running or not (for `optrack status`)."""
        with self._sessions() as session:
            return session.get(AccountPause, self.account_sid)

    def _write_pause(self, until: datetime, reason: str, status: int, at: datetime) -> None:
        with self._sessions.begin() as session:
            insert = dialect.insert(session)
            stmt = insert(AccountPause).values(
                account_sid=self.account_sid,
                paused_until=until,
                reason=reason,
                status_code=status,
                updated_at=at,
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
            if status in AUTH_STATUSES:
                # Its own fact, whichever pause won above: only an accepted request clears it.
                rejected = AccountPause.credentials_rejected_at
                session.execute(
                    update(AccountPause)
                    .where(
                        AccountPause.account_sid == self.account_sid,
                        rejected.is_(None) | (rejected <= at),
                    )
                    .values(credentials_rejected_at=at, credentials_error=reason)
                    .execution_options(synchronize_session=False)
                )

    def _flush_pending(self, now: datetime) -> None:
        """Write what was recorded while the database was unreachable: the pause if it still
        runs, a rejection of the credentials in any case."""
        pending, self._pending = self._pending, None
        rejection, self._pending_rejection = self._pending_rejection, None
        written = None
        try:
            if pending is not None and pending[0] > now:
                self._write_pause(*pending)
                written = pending
                log.info("account pause until %s written to the database", pending[0].isoformat())
            if rejection is not None and rejection != written:
                self._write_pause(*rejection)
        except DB_UNREACHABLE:
            self._pending, self._pending_rejection = pending, rejection
            raise

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


class DbBudget:
    """The account's request budget in the database: at most ``rate`` requests a second from
    every process together (GCRA: each request takes the next free slot, 1/rate apart)."""

    def __init__(self, engine: Engine, account_sid: str, rate: float) -> None:
        self._sessions = sessionmaker(engine)
        self.account_sid = account_sid
        self.spacing = timedelta(seconds=1.0 / rate)

    def reserve(self, now: datetime, max_wait: float) -> float:
        """Take the next slot and return the seconds to wait for it; RetryLater if that wait
        is longer than ``max_wait`` (then no slot is taken)."""
        with self._sessions.begin() as session:
            stmt = select(RequestBudget).where(RequestBudget.account_sid == self.account_sid)
            row = session.scalars(stmt.with_for_update()).one_or_none()
            if row is None:
                session.execute(
                    dialect.insert(session)(RequestBudget)
                    .values(account_sid=self.account_sid, next_slot_at=now)
                    .on_conflict_do_nothing(index_elements=["account_sid"])
                )
                row = session.scalars(stmt.with_for_update()).one()
            slot = max(row.next_slot_at, now)
            wait = (slot - now).total_seconds()
            if wait > max_wait:
                raise RetryLater(slot, "the request budget (OPTRACK_MAX_REQUESTS_PER_SECOND)")
            row.next_slot_at = slot + self.spacing
            return wait
