"""Dead letters and delivery counts in the database, and ticks that do not pile up messages.

SQLite and PostgreSQL; the worker processes that use them are in tests/e2e/test_celery.py and the
fault tests.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from worker import dead_letters, intake, sweep
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


def test_a_claim_no_worker_started_is_not_sent_again_until_the_resend_interval(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    intake.track(sessions, [ID], clock.now())
    assert len(claim(sessions, clock)) == 1
    sent = 1
    # No worker consumes: a tick every 2 s for nine minutes, the lease ran out four times.
    for _ in range(int(590 / 2)):
        clock.advance(2)
        sent += len(claim(sessions, clock))
    assert sent == 1, "ticks piled up messages in a broker nobody consumes"
    clock.advance(10)  # 600 s after the claim: sent once more
    assert len(claim(sessions, clock)) == 1


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
