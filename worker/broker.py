"""The embedded broker: kombu's SQLAlchemy transport, made to lose nothing.

kombu's transport marks a message taken (``visible`` false) when it hands it out, restores
it only when its channel closes cleanly and never deletes it: after a SIGKILL a taken message
and a done one look alike, and neither comes back. This one keeps kombu's tables and adds one
of its own, ``optrack_broker_hold`` (created here, not by Alembic: it is the broker's):

* a message is taken, and its hold row written (the process that took it: host, pid and the
  pid's start time, and a lease), in one short transaction;
* while a process holds messages it renews their lease every quarter lease (a thread, so a
  long task in a solo pool does not stop it);
* an acknowledged message (or one rejected without requeue) is deleted with its hold row:
  the table holds only work not done;
* a requeue, and a clean close, make the same row visible again (kombu put a copy);
* a consumer gives back the messages of dead holders at its first get and then every
  quarter lease: a holder whose process is gone from this host, or whose lease ran out (it
  stopped renewing: another host's crash, a stopped process). A live holder renews, and on
  this host its pid answers: its messages are never given to another;
* at its first get a consumer also settles what a plain kombu transport (an older release)
  left taken, rows with no hold: those taken within ``legacy_window`` of the last take (the
  longest a message can be held: the longest task time limit plus a margin) may have been
  held by a killed process and are given back; older ones were done, and are deleted.

On SQLite every transaction takes the write lock when it begins (``db.make_engine``: WAL, a
30 s busy timeout), so several processes on one broker file queue instead of failing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from json import dumps, loads
from queue import Empty
from typing import Any

from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy import (
    Column,
    Float,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    delete,
    exists,
    false,
    func,
    insert,
    select,
    true,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateIndex, CreateSequence, CreateTable

from worker.db import make_engine, make_sessionmaker
from worker.dialect import in_many, skip_locked

TRANSPORT = "worker.broker:Transport"
# A holder renews its lease every quarter of it; a consumer looks for dead holders as often.
DEFAULT_HOLD_LEASE = 60.0
# When no legacy window is given: Celery's usual ten minutes of visibility.
DEFAULT_LEGACY_WINDOW = 600.0
# While every consuming channel is at its prefetch limit, how often to look for a freed slot
# (an in-memory check, no query); kombu slept its whole polling interval (a second).
FULL_PAUSE = 0.02
log = logging.getLogger(__name__)

hold_metadata = MetaData()
hold_table = Table(
    "optrack_broker_hold",
    hold_metadata,
    Column("message_id", Integer, primary_key=True, autoincrement=False),
    Column("holder", String(200), nullable=False, index=True),
    Column("host", String(200), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("pid_start", String(32)),  # the pid's start time on its host: a reused pid differs
    Column("lease_until", Float, nullable=False),  # seconds since the epoch
)


def kombu_connection(broker_url: str) -> tuple[str, str] | None:
    """``(url, transport)`` for a ``sqla+`` broker URL on SQLite or PostgreSQL, carried by this
    transport; None for another broker (another database stays on kombu's transport).

    kombu takes the transport from a ``+`` in the URL's scheme over any it is given, so the
    ``sqla+`` prefix goes, and so does a driver (``postgresql+psycopg``): the engine is
    ``db.make_engine``'s, psycopg for PostgreSQL, the standard library for SQLite."""
    for prefix in ("sqla+", "sqlalchemy+"):
        if broker_url.startswith(prefix):
            scheme, sep, rest = broker_url.removeprefix(prefix).partition("://")
            dialect = scheme.split("+", 1)[0]
            if sep and dialect in ("sqlite", "postgresql"):
                return f"{dialect}://{rest}", TRANSPORT
    return None


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read().strip()
    except OSError:
        return ""


def _host_key() -> str:
    """This host and pid namespace: where a pid names the same process."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{_read('/proc/sys/kernel/random/boot_id')}/{namespace}"[:200]


def _pid_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot); None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if not stat:
        return None
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None


def _process_gone(pid: int, pid_start: str | None) -> bool:
    """True if process ``pid`` of this host, started at ``pid_start``, no longer runs."""
    if pid_start is not None and os.path.isdir("/proc/self"):
        return _pid_start(pid) != pid_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Broker:
    """One process's side of one broker database: its engine, its identity as a holder, the
    rows it holds and the thread that renews their lease."""

    def __init__(self, url: str, hold_lease: float, legacy_window: float) -> None:
        self.engine: Engine = make_engine(url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(self.engine)
        self.lease = hold_lease
        self.legacy_window = legacy_window
        self.clock: Callable[[], float] = time.time
        self.pid = os.getpid()
        self.host = _host_key()
        self.pid_start = _pid_start(self.pid)
        # Unique, whatever two hosts or namespaces have in common.
        self.holder = f"{socket.gethostname()[:100]}/{self.pid}/{uuid.uuid4().hex}"
        self.held: set[int] = set()
        self.lock = threading.Lock()
        self.settled = False  # legacy rows, at the first get
        self.next_check = 0.0  # dead holders
        self._renewer: threading.Thread | None = None
        self._created = False

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """One short transaction (on SQLite: holding the write lock from its start)."""
        with self.sessions.begin() as session:
            yield session

    def create_tables(self, tables: list[Table]) -> None:
        """kombu's tables and the hold table, if missing (several processes may race)."""
        if self._created:
            return
        with self.engine.begin() as conn:
            for table in tables:
                if conn.dialect.supports_sequences:  # kombu's ids on PostgreSQL
                    for column in table.columns:
                        if isinstance(column.default, Sequence):
                            conn.execute(CreateSequence(column.default, if_not_exists=True))
                conn.execute(CreateTable(table, if_not_exists=True))
                for index in table.indexes:
                    conn.execute(CreateIndex(index, if_not_exists=True))
        self._created = True

    def took(self, message_id: int) -> None:
        with self.lock:
            self.held.add(message_id)
            if self._renewer is None:
                self._renewer = threading.Thread(
                    target=self._renew_forever, name="broker-lease", daemon=True
                )
                self._renewer.start()

    def let_go(self, message_id: int) -> None:
        with self.lock:
            self.held.discard(message_id)

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.lease / 4)
            with self.lock:
                holding = bool(self.held)
            if not holding:
                continue
            try:
                with self.transaction() as session:
                    session.execute(
                        update(hold_table)
                        .where(hold_table.c.holder == self.holder)
                        .values(lease_until=self.clock() + self.lease)
                    )
            except DBAPIError as exc:  # the next renewal may get through; the thread goes on
                log.warning("broker: could not renew the lease of held messages: %s", exc)

    def hold_values(self, message_id: int) -> dict[str, Any]:
        return {
            "message_id": message_id,
            "holder": self.holder,
            "host": self.host,
            "pid": self.pid,
            "pid_start": self.pid_start,
            "lease_until": self.clock() + self.lease,
        }


# One Broker per (process, URL): a forked child builds its own, never its parent's pool.
_brokers: dict[tuple[int, str], Broker] = {}
_brokers_lock = threading.Lock()


def _after_fork_in_child() -> None:
    global _brokers_lock
    _brokers_lock = threading.Lock()  # a parent's thread may have held it across the fork


os.register_at_fork(after_in_child=_after_fork_in_child)


class Channel(kombu_sqla.Channel):
    """kombu's SQLAlchemy channel whose taken messages are held, deleted when done and given
    back when their holder dies."""

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        # Kept, not read through the connection: a close at exit may come after it is gone.
        self._url: str = connection.client.hostname
        self._options: dict[str, Any] = dict(connection.client.transport_options)
        self._queue_ids: dict[str, int] = {}
        # delivery tag → rows this channel took under it (a plain kombu restore copied a
        # message with its tag, so an old broker may hold two rows of one tag)
        self._taken: defaultdict[str, deque[int]] = defaultdict(deque)
        self._no_ack: set[str] = set()  # queues consumed without acknowledgement
        super().__init__(connection, **kwargs)  # type: ignore[no-untyped-call]

    @property
    def broker(self) -> Broker:
        key = (os.getpid(), self._url)
        broker = _brokers.get(key)
        if broker is None:
            with _brokers_lock:
                broker = _brokers.get(key)
                if broker is None:
                    broker = Broker(
                        self._url,
                        float(self._options.get("hold_lease", DEFAULT_HOLD_LEASE)),
                        float(self._options.get("legacy_window", DEFAULT_LEGACY_WINDOW)),
                    )
                    _brokers[key] = broker
        broker.create_tables([self.queue_cls.__table__, self.message_cls.__table__, hold_table])
        return broker

    @property
    def _messages(self) -> Table:
        table: Table = self.message_cls.__table__
        return table

    def _queue_id(self, queue: str) -> int:
        queue_id = self._queue_ids.get(queue)
        if queue_id is not None:
            return queue_id
        queues: Table = self.queue_cls.__table__
        broker = self.broker
        named = select(queues.c.id).where(queues.c.name == queue)
        try:
            with broker.transaction() as session:
                found = session.scalar(named)
                if found is None:
                    created = insert(queues).values(name=queue).returning(queues.c.id)
                    found = session.execute(created).scalar_one()
                queue_id = int(found)
        except IntegrityError:  # another process created it meanwhile (PostgreSQL)
            with broker.transaction() as session:
                queue_id = int(session.execute(named).scalar_one())
        self._queue_ids[queue] = queue_id
        return queue_id

    def _new_queue(self, queue: str, **kwargs: Any) -> None:
        self._queue_id(queue)

    # kombu's two bases name the second argument differently (message, payload).
    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:  # type: ignore[override]
        queue_id = self._queue_id(queue)
        with self.broker.transaction() as session:
            session.execute(
                insert(self._messages).values(
                    payload=dumps(message), queue_id=queue_id, visible=True, version=1
                )
            )

    def _get(self, queue: str, timeout: float | None = None) -> Any:
        queue_id = self._queue_id(queue)
        broker = self.broker
        self._settle(broker)
        messages = self._messages
        with broker.transaction() as session:
            first = (
                select(messages.c.id, messages.c.payload)
                .where(messages.c.queue_id == queue_id, messages.c.visible == true())
                .order_by(messages.c.timestamp, messages.c.id)
                .limit(1)
            )
            row = session.execute(skip_locked(first, session)).first()
            if row is None:
                raise Empty()
            if queue in self._no_ack:  # nothing will acknowledge it: done once handed out
                session.execute(delete(messages).where(messages.c.id == row.id))
                return loads(row.payload)
            session.execute(update(messages).where(messages.c.id == row.id).values(visible=False))
            session.execute(insert(hold_table).values(broker.hold_values(row.id)))
        broker.took(row.id)
        payload = loads(row.payload)
        tag = payload.get("properties", {}).get("delivery_tag")
        with broker.lock:
            self._taken[tag].append(row.id)
        return payload

    def _row_of(self, delivery_tag: str) -> int | None:
        """The row this channel took under ``delivery_tag`` (the oldest), forgotten here."""
        with self.broker.lock:
            rows = self._taken.get(delivery_tag)
            if not rows:
                return None
            row = rows.popleft()
            if not rows:
                del self._taken[delivery_tag]
            return row

    def _let_go(self, message_id: int, *, done: bool) -> None:
        """Drop this process's hold on ``message_id``: delete the message if it is done, else
        make it visible again. Nothing if it was given back meanwhile (its lease ran out):
        another consumer may hold it now."""
        broker = self.broker
        messages = self._messages
        with broker.transaction() as session:
            ours = session.scalar(
                delete(hold_table)
                .where(hold_table.c.message_id == message_id, hold_table.c.holder == broker.holder)
                .returning(hold_table.c.message_id)
            )
            if ours is None:
                log.warning(
                    "broker: message %d was given back while this process held it "
                    "(its lease ran out); left to its new holder",
                    message_id,
                )
            elif done:
                session.execute(delete(messages).where(messages.c.id == message_id))
            else:
                session.execute(
                    update(messages).where(messages.c.id == message_id).values(visible=True)
                )
        broker.let_go(message_id)

    def basic_consume(
        self, queue: str, no_ack: bool, callback: Any, consumer_tag: str, **kwargs: Any
    ) -> Any:
        if no_ack:
            self._no_ack.add(queue)
        return super().basic_consume(queue, no_ack, callback, consumer_tag, **kwargs)  # type: ignore[no-untyped-call]

    def basic_cancel(self, consumer_tag: str) -> Any:
        self._no_ack.discard(self._tag_to_queue.get(consumer_tag))
        return super().basic_cancel(consumer_tag)  # type: ignore[no-untyped-call]

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack, **kwargs)  # type: ignore[no-untyped-call]
        if no_ack and message is not None:
            row = self._row_of(message.delivery_tag)
            if row is not None:
                self._let_go(row, done=True)
        return message

    def basic_ack(self, delivery_tag: str, multiple: bool = False) -> None:
        row = self._row_of(delivery_tag)
        if row is not None:
            self._let_go(row, done=True)
        super().basic_ack(delivery_tag, multiple)  # type: ignore[no-untyped-call]

    def basic_reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:  # a requeue goes through _restore
            row = self._row_of(delivery_tag)
            if row is not None:
                self._let_go(row, done=True)
        super().basic_reject(delivery_tag, requeue)  # type: ignore[no-untyped-call]

    def _restore(self, message: Any) -> None:
        row = self._row_of(message.delivery_tag)
        if row is None:  # not taken by this channel: put again, as kombu does
            super()._restore(message)  # type: ignore[no-untyped-call]
        else:
            self._let_go(row, done=False)

    def _size(self, queue: str) -> int:
        queue_id = self._queue_id(queue)
        messages = self._messages
        with self.broker.transaction() as session:
            count = session.scalar(
                select(func.count())
                .select_from(messages)
                .where(messages.c.queue_id == queue_id, messages.c.visible == true())
            )
        return int(count or 0)

    def _purge(self, queue: str) -> int:
        """Delete the messages waiting (not those held: AMQP purges ready messages only)."""
        queue_id = self._queue_id(queue)
        messages = self._messages
        with self.broker.transaction() as session:
            purged = session.execute(
                delete(messages).where(
                    messages.c.queue_id == queue_id, messages.c.visible == true()
                )
            ).rowcount  # type: ignore[attr-defined]
        return int(purged or 0)

    def _settle(self, broker: Broker) -> None:
        """At the first get, and every quarter lease: give back what dead holders held, and
        (once) settle the rows an older release left taken."""
        now = broker.clock()
        if now < broker.next_check:
            return
        broker.next_check = now + broker.lease / 4
        if not broker.settled:
            self._settle_legacy(broker)
            broker.settled = True
        self._give_back_dead(broker, now)

    def _give_back_dead(self, broker: Broker, now: float) -> None:
        hold = hold_table.c
        with broker.transaction() as session:
            holders = session.execute(
                select(hold.holder, hold.host, hold.pid, hold.pid_start, func.max(hold.lease_until))
                .where(hold.holder != broker.holder)
                .group_by(hold.holder, hold.host, hold.pid, hold.pid_start)
            ).all()
        for holder, host, pid, pid_start, lease_until in holders:
            gone = host == broker.host and _process_gone(pid, pid_start)
            if not gone and lease_until >= now:
                continue  # alive: never given to another
            with broker.transaction() as session:
                taken_back = delete(hold_table).where(hold.holder == holder)
                if not gone:  # unless it renewed meanwhile
                    taken_back = taken_back.where(hold.lease_until < now)
                ids = list(session.scalars(taken_back.returning(hold.message_id)))
                for clause in in_many(session, self._messages.c.id, ids):
                    session.execute(update(self._messages).where(clause).values(visible=True))
            if ids:
                log.warning(
                    "broker: gave back %d message(s) held by %s, %s",
                    len(ids),
                    holder,
                    "whose process is gone" if gone else "whose lease ran out",
                )

    def _settle_legacy(self, broker: Broker) -> None:
        messages = self._messages
        legacy = (messages.c.visible == false()) & ~exists().where(
            hold_table.c.message_id == messages.c.id
        )
        with broker.transaction() as session:
            last = session.scalar(select(func.max(messages.c.timestamp)).where(legacy))
            if last is None and not session.scalar(select(exists().where(legacy))):
                return
            back = legacy
            done = 0
            if last is not None:
                cutoff = last - timedelta(seconds=broker.legacy_window)
                back = legacy & (messages.c.timestamp.is_(None) | (messages.c.timestamp >= cutoff))
                done = session.execute(
                    delete(messages).where(legacy, messages.c.timestamp < cutoff)
                ).rowcount  # type: ignore[attr-defined]
            given = session.execute(update(messages).where(back).values(visible=True)).rowcount  # type: ignore[attr-defined]
        log.warning(
            "broker: an older release left %d message(s) taken: %d taken within %.0f s of its "
            "last take given back (one may have been held by a killed process), %d older "
            "deleted as done",
            (given or 0) + (done or 0),
            given or 0,
            broker.legacy_window,
            done or 0,
        )


class Transport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport with optrack's channel: nothing handed out is lost."""

    Channel = Channel
    connection_errors = (OperationalError,)

    def drain_events(self, connection: Any, timeout: float | None = None, **kwargs: Any) -> None:
        """kombu's loop, but while every consuming channel is at its prefetch limit it looks
        for a freed slot every ``FULL_PAUSE`` instead of sleeping a whole polling interval:
        with prefetch 1 that sleep was a second per message."""
        start = time.monotonic()
        while True:
            try:
                cycle: Any = self.cycle  # set by kombu's constructor
                cycle.get(self._deliver, timeout=timeout)
                return
            except Empty:
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise TimeoutError() from None
                pause = FULL_PAUSE if self._all_full() else self.polling_interval
                if timeout is not None:
                    pause = min(pause, timeout - waited)
                time.sleep(max(pause, 0.0))

    def _all_full(self) -> bool:
        consuming = [c for c in self.channels if c._consumers]
        return bool(consuming) and not any(c.qos.can_consume() for c in consuming)
