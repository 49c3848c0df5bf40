"""The database: typed declarative models and the engine. Alembic owns the schema (migrations/)."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.pool import NullPool

from worker.credentials import DEFAULT_ACCOUNT
from worker.settings import Settings
from worker.tracking import ALL_STATES, ENDED_STATES, PENDING

# The root of every database error, for callers that must not import SQLAlchemy (adapters).
DatabaseError = SQLAlchemyError
# The largest row id a BigInteger column holds: a larger one is refused before any query.
MAX_ROW_ID = 2**63 - 1
# What a database that is down, restarting or locked raises (not a bug in a query).
DB_UNREACHABLE = (OperationalError, InterfaceError)
# What a write the database refused raises, short of being unreachable (catch that first): a
# value it cannot store (NUL on PostgreSQL, a lone surrogate on both: UnicodeEncodeError), a
# constraint.
DB_REFUSED = (SQLAlchemyError, ValueError)

# The Alembic revision these models are: the head of migrations/ (a test keeps them equal).
SCHEMA_REVISION = "0013"

GROUP_KINDS = ("list", "fetch")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend (SQLite stores it naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database; pass an aware UTC value")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base with a naming convention so migrations name constraints the same way."""

    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime()}


class Account(Base):
    """A Twilio account optrack polls with its own credentials (migration 0012).

    ``default`` is the environment's account (``TWILIO_*``): its row holds no credentials. Any
    other holds its SID, its API key's SID if it authenticates with one, and its secret sealed
    with Fernet (``credentials.Vault``), never in clear. Pauses and budgets are keyed by the
    SID (Twilio throttles an account), so a SID names one account at most.
    """

    __tablename__ = "accounts"
    __table_args__ = (
        UniqueConstraint("account_sid"),
        CheckConstraint(
            f"name = '{DEFAULT_ACCOUNT}' OR (account_sid IS NOT NULL AND secret IS NOT NULL)",
            name="credentials",
        ),
        CheckConstraint(
            "max_requests_per_second IS NULL OR max_requests_per_second > 0", name="budget"
        ),
    )

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    account_sid: Mapped[str | None] = mapped_column(String(64))
    api_key_sid: Mapped[str | None] = mapped_column(String(64))
    # A Fernet token (OPTRACK_SECRET_KEY): the Auth Token, or the API key's secret.
    secret: Mapped[str | None] = mapped_column(Text)
    # This account's own OPTRACK_MAX_REQUESTS_PER_SECOND; NULL: the setting's.
    max_requests_per_second: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[datetime]
    # When the secret was last set (add, set-secret): a running worker's clients follow it.
    secret_set_at: Mapped[datetime | None]


class TrackedOperation(Base):
    """One operation optrack follows, with its latest known state and its polling schedule."""

    __tablename__ = "tracked_operations"
    __table_args__ = (
        CheckConstraint(f"status IN {ALL_STATES!r}", name="status"),
        CheckConstraint(
            "total >= 0 AND queued >= 0 AND created >= 0 AND failed >= 0", name="counts"
        ),
        Index(None, "tracked_at"),  # the reports' period filter (migration 0003_reports)
        Index(None, "group_id"),  # a group's members; NULL: waiting to be placed
        Index(None, "account", "status"),  # one account's operations (placing, removing)
    )

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The account whose credentials see it (migration 0012; an older release's insert: default).
    account: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.name"), server_default=DEFAULT_ACCOUNT
    )
    status: Mapped[str] = mapped_column(String(16), default=PENDING)
    total: Mapped[int | None] = mapped_column(Integer)
    queued: Mapped[int | None] = mapped_column(Integer)
    created: Mapped[int | None] = mapped_column(Integer)
    failed: Mapped[int | None] = mapped_column(Integer)
    remote_created_at: Mapped[datetime | None]
    remote_updated_at: Mapped[datetime | None]
    tracked_at: Mapped[datetime]
    # The last answer about this operation that changed its row (its group confirms the rest).
    last_polled_at: Mapped[datetime | None]
    # The poll group that schedules this operation; NULL until the sweep places it.
    group_id: Mapped[int | None] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("poll_groups.id", ondelete="SET NULL"),
    )
    # This operation's own "not before" (backoff after an error); NULL: whenever its group runs.
    not_before: Mapped[datetime | None]
    # When a 404 streak began (migration 0007): it ends tracking only once it lasts the grace.
    not_found_since: Mapped[datetime | None]
    # Answers recorded for this operation: changes and errors (unchanged answers write nothing).
    polls: Mapped[int] = mapped_column(Integer, default=0)
    consecutive_errors: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    ended_at: Mapped[datetime | None]
    # Bumped by every write of a poll result; a history row's seq is the version it created.
    version: Mapped[int] = mapped_column(Integer, default=0)

    @property
    def ended(self) -> bool:
        """True once the operation reached a final state."""
        return self.status in ENDED_STATES


class PollGroup(Base):
    """Operations polled together by one message: a createdAt window (List) or a set (GET).

    The schedule lives here, not on each operation, so a sweep writes one row per group plus
    one per operation that changed.
    """

    __tablename__ = "poll_groups"
    __table_args__ = (
        CheckConstraint(f"kind IN {GROUP_KINDS!r}", name="kind"),
        Index(None, "next_due_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    kind: Mapped[str] = mapped_column(String(8))
    # Every member is of this account: its poll asks with the account's credentials alone.
    account: Mapped[str] = mapped_column(
        String(64), ForeignKey("accounts.name"), server_default=DEFAULT_ACCOUNT
    )
    # createdAt of the members (whole seconds, both ends included); NULL while none is known.
    start_at: Mapped[datetime | None]
    end_at: Mapped[datetime | None]
    members: Mapped[int] = mapped_column(Integer, default=0)
    next_due_at: Mapped[datetime]
    # The sweep that claimed the group; a poll message runs only with the matching token.
    claim_token: Mapped[str | None] = mapped_column(String(36))
    claim_expires_at: Mapped[datetime | None]
    # When a worker started the claim's message (NULL: still in the broker). An expired claim
    # never started is sent again only after OPTRACK_RESEND_AFTER (migration 0008).
    claim_started_at: Mapped[datetime | None]
    # When the last poll of the group started: every member it saw was confirmed then.
    last_polled_at: Mapped[datetime | None]
    last_change_at: Mapped[datetime | None]
    # What the last listing of the window held (List groups): operations and pages.
    listed: Mapped[int | None] = mapped_column(Integer)
    pages: Mapped[int | None] = mapped_column(Integer)
    consecutive_errors: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime]
    # A poll round cut short (the lease's deadline, a pause, a shutdown) goes on where it
    # stopped (migration 0010): when the round began; the List page to read next and the
    # window its token belongs to; or the last member asked by GET. NULL: the next poll
    # starts afresh.
    round_started_at: Mapped[datetime | None]
    resume_token: Mapped[str | None] = mapped_column(Text)
    resume_start_at: Mapped[datetime | None]
    resume_end_at: Mapped[datetime | None]
    resume_after: Mapped[str | None] = mapped_column(String(64))
    # Seconds per request the last poll measured: the sweep keeps one poll to half a lease.
    request_seconds: Mapped[float | None] = mapped_column(Float)


class HistoryEntry(Base):
    """One observed change of an operation's status or stats."""

    __tablename__ = "operation_history"
    __table_args__ = (
        # One row per version of the operation: a redelivered poll cannot add a second one.
        UniqueConstraint("operation_id", "seq"),
        Index(None, "operation_id", "observed_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    operation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tracked_operations.id", ondelete="CASCADE")
    )
    seq: Mapped[int] = mapped_column(Integer)
    observed_at: Mapped[datetime]
    remote_updated_at: Mapped[datetime]
    status: Mapped[str] = mapped_column(String(16))
    total: Mapped[int] = mapped_column(Integer)
    queued: Mapped[int] = mapped_column(Integer)
    created: Mapped[int] = mapped_column(Integer)
    failed: Mapped[int] = mapped_column(Integer)


class AccountPause(Base):
    """The account-wide "no API call before" time, shared by every worker on every machine."""

    __tablename__ = "account_pauses"

    account_sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    paused_until: Mapped[datetime]
    reason: Mapped[str] = mapped_column(Text)
    status_code: Mapped[int] = mapped_column(Integer)
    updated_at: Mapped[datetime]
    # 409/429/503 answers in a row, whoever got them; a 200 sets it back to 0. A Retry-After
    # of 0 (or none usable) waits longer with each (migration 0005).
    consecutive_throttles: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The last 401/403 and why, kept apart from the pause (migration 0011): a later pause of
    # another kind does not hide it. A 200 sent after it clears both: the credentials work.
    credentials_rejected_at: Mapped[datetime | None]
    credentials_error: Mapped[str | None] = mapped_column(Text)


class RequestBudget(Base):
    """The account's request budget (a GCRA token bucket), shared by every worker."""

    __tablename__ = "request_budgets"

    account_sid: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The theoretical arrival time of the next request: nothing is sent before it.
    next_slot_at: Mapped[datetime]


class Notice(Base):
    """The outbox row of one operation's end, written with the state change that ends it."""

    __tablename__ = "notices"
    __table_args__ = (
        # One notice per operation, ever: a replayed end cannot queue a second one.
        UniqueConstraint("operation_id"),
        Index(None, "delivered_at", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    operation_id: Mapped[str] = mapped_column(
        String(64), ForeignKey("tracked_operations.id", ondelete="CASCADE")
    )
    # The operation's final record (the fields of `optrack status --json`), as JSON text.
    payload: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime]
    # Due time; a dispatcher's claim pushes it forward by its lease, a failure by the backoff.
    next_attempt_at: Mapped[datetime]
    claim_token: Mapped[str | None] = mapped_column(String(36))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Per channel, so a retry after a partial failure does not resend what already went out.
    task_sent_at: Mapped[datetime | None]
    webhook_sent_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(Text)


class TaskDelivery(Base):
    """How many times one task message (by Celery task id) was started: the poison counter."""

    __tablename__ = "task_deliveries"

    task_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(64))
    deliveries: Mapped[int] = mapped_column(Integer, default=0)
    first_at: Mapped[datetime]
    last_at: Mapped[datetime]


class DeadLetter(Base):
    """A task message optrack gave up on, kept whole to be listed and replayed."""

    __tablename__ = "dead_letters"
    __table_args__ = (
        # One letter per message: a redelivery of a buried message does not bury it twice.
        UniqueConstraint("task_id"),
        Index(None, "replayed_at"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    task: Mapped[str] = mapped_column(String(64))
    task_id: Mapped[str] = mapped_column(String(64))
    # The message's positional arguments as JSON text (messages are JSON only).
    args: Mapped[str] = mapped_column(Text)
    reason: Mapped[str] = mapped_column(Text)
    deliveries: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime]
    # Set by `optrack dead-letters replay`, with the id of the message it sent.
    replayed_at: Mapped[datetime | None]
    replay_task_id: Mapped[str | None] = mapped_column(String(64))


class HttpToken(Base):
    """A token of the HTTP API minted by `optrack tokens add` (migration 0013).

    Only the SHA-256 digest of the token is stored: the token is 256 random bits, so the
    digest alone cannot be turned back into it. ``accounts`` is a JSON list of the account
    names it may see (NULL: every account); ``read_only`` tokens change nothing.
    """

    __tablename__ = "http_tokens"
    __table_args__ = (UniqueConstraint("digest"),)

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64))
    accounts: Mapped[str | None] = mapped_column(Text)
    read_only: Mapped[bool]
    created_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class Heartbeat(Base):
    """The last time a process or the tick showed it was alive, and the schema it runs: for
    `optrack health`, and to refuse to run beside another release (``liveness``)."""

    __tablename__ = "heartbeats"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    beat_at: Mapped[datetime]
    # SCHEMA_REVISION of the writer (migration 0009); NULL: written by an older release.
    schema_revision: Mapped[str | None] = mapped_column(String(32))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers run beside the one writer; the busy timeout makes writers queue.
    # The driver's own transaction handling is turned off so that _sqlite_begin can take the
    # write lock up front: a deferred transaction that reads, then writes after another
    # process committed, fails with "database is locked" instead of waiting.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _sqlite_begin(connection: Any) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


# The longest a fork waits for this process's SQLite connections in use to be given back: a
# statement waits up to its busy timeout (30 s) for the lock, and a transaction is short.
FORK_WAIT = 60.0
_log = logging.getLogger(__name__)


class ForkGuard:
    """Holds a fork of this process while another of its threads uses an SQLite connection.

    SQLite keeps each process's locks on a database file in memory, shared by all its
    connections to that file. A child forked while a thread of its parent is inside a
    transaction (every one takes the write lock at BEGIN IMMEDIATE) inherits that bookkeeping,
    not the lock: its own connections then see the write lock taken by a connection of their
    own process that will never release it, and every write of the child waits out its busy
    timeout and fails, for ever. Celery forks its pool processes and beat from a main process
    whose threads (the metrics server, the heartbeat) use the database meanwhile.

    An open connection, even idle, is no better: the child shares its record of the file
    (and of the WAL index) with its own connections, and the parent's checkpoint at its close
    can lose or corrupt what the child wrote ("database disk image is malformed").

    So a connection opened by another thread counts from before it opens until it is closed
    (``_GuardedConnection``, every SQLite engine's). Before a fork the guard waits for those to
    close (at most ``FORK_WAIT``: a NullPool engine's, as the metrics server's and the
    heartbeat's, closes after each use) and holds new ones until the fork is done; a thread
    that already has one open may open another, and the forking thread's own are not waited
    for (a pooled engine's idle connections: a process forks before it uses one, or disposes
    of its engines)."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._in_use: dict[int, int] = {}  # id of an open connection → the opener's ident
        self._forking = False

    @property
    def forking(self) -> bool:
        """True while a fork waits for connections in use to be given back."""
        return self._forking

    def opening(self, connection: object) -> None:
        """``connection`` is about to open, in this thread: after a fork under way."""
        me = threading.get_ident()
        with self._cond:
            if me not in self._in_use.values():
                self._cond.wait_for(lambda: not self._forking)
            self._in_use[id(connection)] = me

    def closed(self, connection: object) -> None:
        with self._cond:
            if self._in_use.pop(id(connection), None) is not None:
                self._cond.notify_all()

    def before_fork(self) -> None:
        me = threading.get_ident()
        deadline = time.monotonic() + FORK_WAIT
        with self._cond:
            self._forking = True
            while any(owner != me for owner in self._in_use.values()):
                left = deadline - time.monotonic()
                if left <= 0:
                    _log.warning(
                        "forking while %d SQLite connection(s) are in use by other threads: "
                        "the child may find the database locked",
                        len(self._in_use),
                    )
                    return
                self._cond.wait(left)

    def after_fork_in_parent(self) -> None:
        with self._cond:
            self._forking = False
            self._cond.notify_all()

    def after_fork_in_child(self) -> None:
        self._reset()  # the parent's connections are not this process's to give back


FORK_GUARD = ForkGuard()
os.register_at_fork(
    before=FORK_GUARD.before_fork,
    after_in_parent=FORK_GUARD.after_fork_in_parent,
    after_in_child=FORK_GUARD.after_fork_in_child,
)


class _GuardedConnection(sqlite3.Connection):
    """An SQLite connection counted open by ``FORK_GUARD`` from before it opens until it is
    closed (the last one's close checkpoints the WAL under an exclusive lock)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        FORK_GUARD.opening(self)
        try:
            super().__init__(*args, **kwargs)
        except BaseException:
            FORK_GUARD.closed(self)
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            FORK_GUARD.closed(self)


def make_engine(url: str, *, pooled: bool = True, **kwargs: Any) -> Engine:
    """Create an engine; SQLite gets WAL mode, a busy timeout and foreign keys. ``pooled``
    False: a connection per use, for a process that reads seldom (a metrics scrape)."""
    if not pooled:
        kwargs["poolclass"] = NullPool
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    if url.startswith("sqlite"):
        connect_args = {"timeout": 30, **kwargs.get("connect_args", {})}
        kwargs["connect_args"] = {"factory": _GuardedConnection, **connect_args}
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """A session factory that keeps loaded values usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def ensure_sqlite_dirs(settings: Settings) -> None:
    """Create the parent folders of SQLite files named by the database and broker URLs."""
    for url in (settings.database_url, settings.broker_url):
        if "sqlite:///" in url:
            path = url.split("sqlite:///", 1)[1].split("?", 1)[0]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
