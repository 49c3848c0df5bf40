"""A stopping worker gives back the claims of the poll messages it holds and never started.

The worker's own bookkeeping is Celery's (``celery.worker.state``: the requests received, and
those a pool process started), filled with real ``Request`` objects built from task messages;
the claims are in SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery.contrib.testing.mocks import TaskMessage
from celery.worker import state as worker_state
from celery.worker.request import Request
from sqlalchemy.orm import Session, sessionmaker

from worker import intake, sweep, tasks
from worker.celery_app import POLL_TASK, TRACK_TASK, OptrackCelery
from worker.clock import FakeClock
from worker.db import PollGroup
from worker.repository import GroupClaim, Repository
from worker.runtime import Runtime
from worker.settings import Settings
from worker.tracking import PollPolicy

IDS = ["comms_operation_01h9krwprkeee8fzqspvwy6nq8", "comms_operation_01h9krwprkeee8fzqspvwy6nq9"]
POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    lease=timedelta(seconds=120),
    strategy="fetch",
    fetch_group=1,  # one group per operation
)


# Celery's sets of requests are weak: the worker's consumer and pool hold the requests, here
# this list does.
HELD: list[Request] = []


@pytest.fixture
def stopping(db_url: str, clock: FakeClock) -> Iterator[OptrackCelery]:
    """An optrack app on the test's database, as a worker's main process has it."""
    app = OptrackCelery("stopping", set_as_current=False)
    app._runtime = Runtime(Settings(database_url=db_url, broker_url="memory://"), clock=clock)
    yield app
    HELD.clear()
    for request in list(worker_state.reserved_requests):
        worker_state.task_ready(request)
    app.close_runtime()
    app.close()


def received(app: OptrackCelery, name: str, *args: object, started: bool = False) -> Request:
    """A message this worker received (and, ``started``, a pool process began); its task is
    optrack's own (``worker.tasks``, shared with every app), never run here."""
    assert {tasks.poll.name, tasks.track.name} <= set(app.tasks)
    request = Request(TaskMessage(name, args=args), app=app)
    worker_state.task_reserved(request)
    if started:
        worker_state.task_accepted(request)
    HELD.append(request)
    return request


def tick(sessions: sessionmaker[Session], clock: FakeClock) -> list[GroupClaim]:
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), POLICY, limit=100, paused_until=None, send=claims.append)
    return claims


def test_a_stopping_worker_gives_back_the_claims_of_polls_it_never_started(
    stopping: OptrackCelery, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    intake.track(sessions, IDS, clock.now())
    waiting, running = tick(sessions, clock)
    received(stopping, POLL_TASK, waiting.group_id, waiting.token)
    received(stopping, POLL_TASK, running.group_id, running.token, started=True)
    with sessions.begin() as session:
        Repository(session).start_claim(running.group_id, running.token, clock.now())
    received(stopping, TRACK_TASK, IDS)  # not a poll
    received(stopping, POLL_TASK, IDS, None, "fetch")  # 0.1.0's shape: no claim to give back
    clock.advance(3)

    stopping.note_unstarted()  # the warm shutdown begins (SIGTERM)
    # Celery forgets the unstarted requests as it closes its connection (Consumer.on_close).
    for request in list(worker_state.reserved_requests):
        if request not in worker_state.active_requests:
            worker_state.reserved_requests.discard(request)
    assert stopping.give_back_unstarted() == 1  # once the pool stopped
    with sessions() as session:
        given = session.get(PollGroup, waiting.group_id)
        kept = session.get(PollGroup, running.group_id)
        assert given is not None and kept is not None
        assert (given.claim_token, given.claim_expires_at) == (None, None)
        assert given.next_due_at == clock.now()  # due at once, not after the lease
        assert kept.claim_token == running.token  # its poll gives it back itself
    (again,) = tick(sessions, clock)  # the next start's first tick polls it
    assert again.group_id == waiting.group_id and again.token != waiting.token


def test_a_claim_started_meanwhile_is_left_to_its_poll(
    stopping: OptrackCelery, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    """The message went to a pool process after the worker read its list: started in the
    database, it is not given back under the poll's feet."""
    intake.track(sessions, IDS[:1], clock.now())
    (claim,) = tick(sessions, clock)
    received(stopping, POLL_TASK, claim.group_id, claim.token)
    with sessions.begin() as session:
        Repository(session).start_claim(claim.group_id, claim.token, clock.now())
    assert stopping.give_back_unstarted() == 0
    with sessions() as session:
        group = session.get(PollGroup, claim.group_id)
        assert group is not None and group.claim_token == claim.token
