"""A message of optrack 0.1.0 translated into today's work, on SQLite and PostgreSQL.

0.1.0's ``optrack.poll(operation_ids, claim_token, strategy)`` makes the groups of those
operations due now (``worker.compat``, ``sweep.hasten``). The same messages through a real
broker and worker are in tests/e2e/test_old_messages.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from worker import compat, intake
from worker.celery_app import POLL_TASK
from worker.clock import FakeClock
from worker.db import PollGroup
from worker.errors import InvalidOperationId
from worker.planning import FETCH, NewGroup
from worker.repository import Repository
from worker.runtime import Runtime
from worker.settings import load_settings

A, B, C, D, E, ENDED = (
    f"comms_operation_01h9krwprkeee8fzqspvwy6n{s}" for s in ["a1", "b2", "c3", "d4", "e5", "f6"]
)
LATER = timedelta(hours=1)


@pytest.fixture
def runtime(db_url: str, clock: FakeClock, tmp_path: Path) -> Iterator[Runtime]:
    """A worker process's runtime on the test's database and clock."""
    env = {"OPTRACK_HOME": str(tmp_path), "OPTRACK_DATABASE_URL": db_url}
    # GET groups of two: the full groups below take no one and are never merged.
    settings = load_settings({**env, "OPTRACK_BATCH_SIZE": "2"})
    rt = Runtime(settings, clock=clock)
    yield rt
    rt.close()


def groups(
    sessions: sessionmaker[Session], clock: FakeClock, *members: tuple[str, ...]
) -> list[int]:
    """Groups of ``members``, polled a moment ago: next due an hour from now."""
    with sessions.begin() as session:
        repo = Repository(session)
        ids = [repo.create_group(NewGroup(FETCH, m), clock.now()) for m in members]
        session.execute(update(PollGroup).values(next_due_at=clock.now() + LATER))
    return ids


def due(sessions: sessionmaker[Session], clock: FakeClock) -> set[int]:
    with sessions() as session:
        stmt = select(PollGroup.id).where(PollGroup.next_due_at <= clock.now())
        return set(session.scalars(stmt))


def test_an_old_poll_makes_the_groups_of_its_operations_due_now(
    runtime: Runtime, clock: FakeClock
) -> None:
    sessions = runtime.sessions
    intake.track(sessions, [A, B, C, D, E, ENDED], clock.now())
    g_ab, g_ce = groups(sessions, clock, (A, B), (C, E))
    with sessions.begin() as session:
        Repository(session).update_many([{"id": ENDED, "status": "COMPLETED"}])
    assert due(sessions, clock) == set()

    # As 0.1.0's tick sent it: IDs, its claim token, a strategy; D is tracked but in no group
    # yet, the unknown ID is nobody's and the ended one is done.
    unknown = "comms_operation_01h9krwprkeee8fzqspvwy6nzz"
    work = compat.translate(POLL_TASK, [[A, D, ENDED, unknown], "a44c235c", "fetch"], {})
    assert work is not None
    result = work(runtime)
    with sessions() as session:
        placed = Repository(session).get(D)
        assert placed is not None and placed.group_id not in (None, g_ab, g_ce)  # as a tick would
        g_d = placed.group_id
    assert result == {"groups": 2, "waiting": 0}
    assert due(sessions, clock) == {g_ab, g_d}  # C's group keeps its time

    # The keyword form, 0.1.0's defaults: C's group too; a group already due stays due.
    clock.advance(5)
    work = compat.translate(POLL_TASK, [], {"operation_ids": [C, B]})
    assert work is not None
    assert work(runtime) == {"groups": 2, "waiting": 0}  # B's and C's
    assert due(sessions, clock) == {g_ab, g_ce, g_d}

    # The due groups are claimed by the next tick like any other: the old poll became a poll.
    with sessions.begin() as session:
        claims = Repository(session).claim_due(clock.now(), 10, timedelta(seconds=120))
    assert {c.group_id for c in claims} == {g_ab, g_ce, g_d}


def test_an_old_poll_with_a_bad_id_is_rejected_and_writes_nothing(
    runtime: Runtime, clock: FakeClock
) -> None:
    intake.track(runtime.sessions, [A], clock.now())
    groups(runtime.sessions, clock, (A,))
    work = compat.translate(POLL_TASK, [[A, "../../etc/passwd"], None, "fetch"], {})
    assert work is not None
    with pytest.raises(InvalidOperationId):  # the guard rejects it once (InvalidMessage route)
        work(runtime)
    assert due(runtime.sessions, clock) == set()
