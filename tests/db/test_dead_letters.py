"""Dead letters and delivery counts in the database, and ticks that do not pile up messages.

SQLite and PostgreSQL; the worker processes that use them are in tests/e2e/test_celery.py and the
fault tests.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import dead_letters, intake, sweep
from worker.celery_app import POLL_TASK, waiting_messages
from worker.clock import FakeClock
from worker.db import PollGroup, TaskDelivery
from worker.repository import GroupClaim, Repository
from worker.tracking import PollPolicy

ID = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    lease=timedelta(seconds=120),
    resend_after=timedelta(seconds=600),
    strategy="fetch",
)


def test_deliveries_are_counted_per_message_and_a_letter_is_kept_once(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    with sessions.begin() as session:
        counts = [dead_letters.count_delivery(session, "t-1", "optrack.track", clock.now())]
        counts.append(dead_letters.count_delivery(session, "t-1", "optrack.track", clock.now()))
        counts.append(dead_letters.count_delivery(session, "t-2", "optrack.track", clock.now()))
    assert counts == [1, 2, 1]
    with sessions.begin() as session:
        first = dead_letters.bury(
            session,
            task_id="t-1",
            task="optrack.track",
            args=[[ID]],
            reason="started 2 times",
            deliveries=2,
            now=clock.now(),
        )
        again = dead_letters.bury(
            session,
            task_id="t-1",
            task="optrack.track",
            args=[[ID]],
            reason="again",
            deliveries=3,
            now=clock.now(),
        )
        dead_letters.forget_delivery(session, "t-2")
    assert (first, again) == (True, False)
    with sessions() as session:
        assert list(session.scalars(select(TaskDelivery.task_id))) == []  # both counters gone
        assert dead_letters.waiting(session) == 1
        (letter,) = dead_letters.letters(session)
    assert (letter.task, letter.args, letter.deliveries) == ("optrack.track", [[ID]], 2)
    assert dead_letters.as_json(letter)["replayed_at"] is None

    with sessions.begin() as session:
        assert [x.id for x in dead_letters.to_replay(session, None)] == [letter.id]
        dead_letters.mark_replayed(session, letter.id, "t-9", clock.now())
    with sessions() as session:
        assert dead_letters.waiting(session) == 0
        assert dead_letters.letters(session) == []
        (shown,) = dead_letters.letters(session, replayed=True)
        assert shown.replay_task_id == "t-9"
        assert dead_letters.to_replay(session, [letter.id]) == []


def claim(sessions: sessionmaker[Session], clock: FakeClock) -> list[GroupClaim]:
    """One tick's claims (sent nowhere: no worker consumes)."""
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), POLICY, limit=100, paused_until=None, send=claims.append)
    return claims


@pytest.fixture
def broker() -> Iterator[Celery]:
    """A real kombu broker (the memory transport) with a queue of this test's own, which no
    worker consumes."""
    app = Celery("lost-messages", broker="memory://", set_as_current=False)
    app.conf.task_default_queue = f"polls-{uuid.uuid4().hex}"
    yield app
    app.close()


def tick(
    sessions: sessionmaker[Session], clock: FakeClock, broker: Celery, *, publish: bool = True
) -> list[GroupClaim]:
    """One tick as ``tasks.tick`` runs it: the queue's depth asked first, then the claims sent
    to ``broker`` (or, ``publish=False``, a tick killed after its commit: nothing sent)."""
    claims: list[GroupClaim] = []

    def send(claim: GroupClaim) -> None:
        if publish:
            broker.send_task(POLL_TASK, args=[claim.group_id, claim.token])
        claims.append(claim)

    empty = waiting_messages(broker) == 0
    sweep.sweep(
        sessions,
        clock.now(),
        POLICY,
        limit=100,
        paused_until=None,
        send=send,
        queue_empty=empty,
    )
    return claims


def lose_everything(broker: Celery) -> None:
    """The broker restarted without its data (Redis without persistence): the queue is gone."""
    with broker.connection_for_write() as conn:
        conn.default_channel.queue_purge(broker.conf.task_default_queue)


@pytest.mark.parametrize("lost", ["tick killed before sending", "broker lost the message"])
def test_a_lost_message_is_claimed_again_when_its_lease_ends(
    sessions: sessionmaker[Session], clock: FakeClock, broker: Celery, lost: str
) -> None:
    intake.track(sessions, [ID], clock.now())
    killed = lost == "tick killed before sending"
    (first,) = tick(sessions, clock, broker, publish=not killed)
    if not killed:
        assert waiting_messages(broker) == 1
        lose_everything(broker)
    assert waiting_messages(broker) == 0
    for _ in range(59):  # a tick every 2 s while the lease (120 s) holds: nothing
        clock.advance(2)
        assert tick(sessions, clock, broker) == []
    clock.advance(2)  # the lease ended: the first tick after it claims and sends again
    (second,) = tick(sessions, clock, broker)
    assert (second.group_id, second.expires_at) == (first.group_id, clock.now() + POLICY.lease)
    assert second.token != first.token
    assert waiting_messages(broker) == 1
    with sessions.begin() as session:
        # The original, had it come late after all, holds a stale token: it does nothing.
        repo = Repository(session)
        repo.start_claim(first.group_id, first.token, clock.now())
        assert repo.claimed_group(first.group_id, first.token) is None
        group = session.get(PollGroup, first.group_id)
        assert group is not None and group.claim_started_at is None


def test_while_the_queue_holds_messages_an_unstarted_claim_is_not_sent_again_until_the_resend_interval(  # noqa: E501
    sessions: sessionmaker[Session], clock: FakeClock, broker: Celery
) -> None:
    """No worker consumes: the message waits, and ticks every 2 s for nine minutes (the lease
    ran out four times) add none; only the resend interval sends one more."""
    intake.track(sessions, [ID], clock.now())
    sent = len(tick(sessions, clock, broker))
    for _ in range(int(590 / 2)):
        clock.advance(2)
        sent += len(tick(sessions, clock, broker))
    assert sent == 1, "ticks piled up messages in a broker nobody consumes"
    assert waiting_messages(broker) == 1
    clock.advance(10)  # 600 s after the claim: sent once more
    assert len(tick(sessions, clock, broker)) == 1
    assert waiting_messages(broker) == 2


def test_a_claim_whose_message_was_started_is_due_again_after_the_lease(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    """A worker killed mid-poll: its group waits for the lease, not for the resend interval."""
    intake.track(sessions, [ID], clock.now())
    (first,) = claim(sessions, clock)
    with sessions.begin() as session:
        Repository(session).start_claim(first.group_id, first.token, clock.now())
        group = session.get(PollGroup, first.group_id)
        assert group is not None and group.claim_started_at == clock.now()
    clock.advance(119)
    assert claim(sessions, clock) == []
    clock.advance(1)
    (second,) = claim(sessions, clock)
    assert second.group_id == first.group_id and second.token != first.token
    with sessions() as session:
        group = session.get(PollGroup, first.group_id)
        assert group is not None and group.claim_started_at is None  # a new claim, not started
