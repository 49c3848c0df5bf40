"""Which releases run on this database: each process's heartbeat carries its schema revision.

Rolling upgrades are made safe by refusing, not by mixing: a release refuses to start (and
`optrack db upgrade` to migrate) while a process of another release still beats on the same
database, and says which and what to do (docs/operations.md, "Upgrading"). A worker's and
beat's main process beat every ``PERIOD`` from a thread (``ProcessHeartbeat``) and delete their
row when they stop; a crashed process's row ages out after ``WINDOW``. A release before 0009
only wrote the ``beat`` row from its tick, with no revision: a fresh one is an older release.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, delete, inspect, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from worker import dialect
from worker.clock import Clock
from worker.db import DB_UNREACHABLE, SCHEMA_REVISION, Heartbeat, make_engine
from worker.errors import OptrackError

log = logging.getLogger(__name__)

PERIOD = timedelta(seconds=10)
# A heartbeat younger than this is a process still running.
WINDOW = timedelta(seconds=30)
# What a release before 0009 wrote from every tick, and nothing else.
LEGACY_BEAT = "beat"
# Rows of processes that died without a word are dropped after a day.
FORGET_AFTER = timedelta(days=1)
# The last time any process configured to deliver completion notices was alive: not a
# process's row (no revision, so no release check reads it, and it outlives the process).
NOTICES = "notices"


class OtherReleaseRunning(OptrackError):
    """Raised when a process of another release still beats on this database."""


@dataclass(frozen=True)
class Sighting:
    """A process of another release, seen alive."""

    name: str
    schema_revision: str | None
    age: float

    def describe(self) -> str:
        schema = self.schema_revision or "before 0009"
        return f"{self.name} (schema {schema}, last seen {self.age:.0f}s ago)"


def identity(role: str) -> str:
    """This process's heartbeat name: ``worker:HOST:PID`` or ``beat:HOST:PID``."""
    return f"{role}:{socket.gethostname()}:{os.getpid()}"


def heartbeat(
    session: Session, name: str, now: datetime, schema_revision: str | None = SCHEMA_REVISION
) -> None:
    """Record that ``name`` was alive at ``now``; a late write never moves it back."""
    stmt = dialect.insert(session)(Heartbeat).values(
        name=name, beat_at=now, schema_revision=schema_revision
    )
    stmt = stmt.on_conflict_do_update(
        index_elements=["name"],
        set_={"beat_at": stmt.excluded.beat_at, "schema_revision": stmt.excluded.schema_revision},
        where=Heartbeat.beat_at < stmt.excluded.beat_at,
    )
    session.execute(stmt)


def beat(session: Session, name: str, now: datetime) -> None:
    """Record that process ``name`` of this release is alive at ``now``; forget the processes
    that died a day ago without a word."""
    heartbeat(session, name, now)
    session.execute(
        delete(Heartbeat).where(
            Heartbeat.beat_at < now - FORGET_AFTER, Heartbeat.schema_revision.is_not(None)
        )
    )


def notices_delivered(session: Session, now: datetime) -> None:
    """Record that a process configured to deliver completion notices is alive at ``now``
    (no revision: the release check does not count it)."""
    heartbeat(session, NOTICES, now, schema_revision=None)


def notices_last_delivered(session: Session) -> datetime | None:
    """When a process configured to deliver completion notices was last alive, if ever."""
    row = session.get(Heartbeat, NOTICES)
    return None if row is None else row.beat_at


def stopped(session: Session, name: str) -> None:
    """Forget process ``name``: it stopped cleanly."""
    session.execute(delete(Heartbeat).where(Heartbeat.name == name))


def other_releases(engine: Engine, now: datetime) -> list[Sighting]:
    """The processes of another release that beat within ``WINDOW`` of ``now``; works on the
    schema of any revision (a database not migrated yet is the usual case)."""
    inspector = inspect(engine)
    if not inspector.has_table("heartbeats"):
        return []
    columns = {column["name"] for column in inspector.get_columns("heartbeats")}
    revision = "schema_revision" if "schema_revision" in columns else "NULL"
    query = text(f"SELECT name, beat_at, {revision} FROM heartbeats")  # no input in it
    with Session(engine) as session:
        rows = session.execute(
            query.columns(Heartbeat.name, Heartbeat.beat_at, Heartbeat.schema_revision)
        ).all()
    seen = []
    for name, beat_at, schema in rows:
        legacy = schema is None and name == LEGACY_BEAT
        if beat_at is None or (schema is None and not legacy) or schema == SCHEMA_REVISION:
            continue
        age = (now - beat_at).total_seconds()
        if age <= WINDOW.total_seconds():
            seen.append(Sighting(name, schema, max(0.0, age)))
    return sorted(seen, key=lambda s: s.name)


def refuse_beside_other_releases(engine: Engine, now: datetime) -> None:
    """Raise ``OtherReleaseRunning`` naming the processes of another release still alive."""
    seen = other_releases(engine, now)
    if seen:
        names = "; ".join(s.describe() for s in seen)
        raise OtherReleaseRunning(
            f"another release of optrack still runs on this database: {names}. This release "
            f"is schema {SCHEMA_REVISION}. Stop every worker and beat of the other release "
            f"(a stopped process is forgotten within {WINDOW.total_seconds():.0f}s), then "
            "`optrack db upgrade`, then start this release (docs/operations.md, Upgrading)"
        )


class ProcessHeartbeat:
    """A daemon thread that beats for this process every ``PERIOD`` until ``stop``."""

    def __init__(
        self, database_url: str, role: str, clock: Clock, *, delivers_notices: bool = False
    ) -> None:
        self.name = identity(role)
        self._clock = clock
        # Its settings name a notice channel: every process then queues completion notices.
        self._delivers_notices = delivers_notices
        # No pooled connection is held between beats, nor inherited by a forked child.
        self._engine = make_engine(database_url, pooled=False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{role}", daemon=True)

    def refuse_beside_other_releases(self) -> None:
        """Raise ``OtherReleaseRunning`` if a process of another release is alive."""
        refuse_beside_other_releases(self._engine, self._clock.now())

    def start(self) -> None:
        """Beat now, then every ``PERIOD``."""
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and delete this process's row (best effort: the database may be gone)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:
            with Session(self._engine) as session, session.begin():
                stopped(session, self.name)
        except SQLAlchemyError as exc:
            log.info("heartbeat: could not delete %s at stop: %s", self.name, type(exc).__name__)
        self._engine.dispose()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with Session(self._engine) as session, session.begin():
                    beat(session, self.name, self._clock.now())
                    if self._delivers_notices:
                        notices_delivered(session, self._clock.now())
            except DB_UNREACHABLE as exc:  # down a moment: the next beat tries again
                log.info("heartbeat: database unreachable (%s)", type(exc).__name__)
            self._stop.wait(PERIOD.total_seconds())
