"""Intake by the ID's time, on SQLite and PostgreSQL against the sandbox: once an account's
IDs are proven to carry their creation time (against the createdAt its operations showed), a
new operation joins the List window that covers its ID's time and costs no request of its
own; an account whose IDs do not carry it is placed as before, and a wrong guess still ends
recorded, by the fallback GET.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from worker import intake
from worker.clock import FakeClock
from worker.db import TrackedOperation
from worker.repository import ID_PROOF_MIN, ID_PROOF_SAMPLE, Repository
from worker.sandbox import SandboxServer


def seen_as(sessions: sessionmaker[Session], created: dict[str, datetime]) -> None:
    """Record each operation's createdAt, as a poll that saw it would."""
    with sessions.begin() as session:
        for op_id, at in created.items():
            session.execute(
                update(TrackedOperation)
                .where(TrackedOperation.id == op_id)
                .values(remote_created_at=at.replace(microsecond=0))
            )


def proven(sessions: sessionmaker[Session], clock: FakeClock, account: str = "default") -> bool:
    with sessions() as session:
        return Repository(session).ids_carry_time(account, clock.now())


def test_ids_carry_time_once_enough_agree_and_none_disagrees(
    sessions: sessionmaker[Session], sandbox: SandboxServer, clock: FakeClock
) -> None:
    sandbox.simulation.ulid_ids = True
    hour_ago = (clock.now() - timedelta(hours=1)).timestamp()
    ops = [sandbox.add_operation(created_at=hour_ago + 7.5 * i) for i in range(ID_PROOF_MIN + 1)]
    intake.track(sessions, [o.id for o in ops], clock.now())
    assert not proven(sessions, clock)  # nothing seen yet
    created = {o.id: datetime.fromtimestamp(o.created_at, UTC) for o in ops}
    seen_as(sessions, dict(list(created.items())[: ID_PROOF_MIN - 1]))
    assert not proven(sessions, clock)  # too few agree
    seen_as(sessions, created)
    assert proven(sessions, clock)
    assert not proven(sessions, clock, "acme")  # an account proves its own IDs

    # One operation seen with a createdAt its ID does not carry: the proof is withdrawn...
    clock.advance(1)
    wrong = sandbox.add_operation(created_at=hour_ago)
    intake.track(sessions, [wrong.id], clock.now())
    seen_as(sessions, {wrong.id: clock.now() - timedelta(hours=3)})
    assert not proven(sessions, clock)
    # ... until it is older than the latest ID_PROOF_SAMPLE seen.
    clock.advance(1)
    more = [sandbox.add_operation(created_at=hour_ago) for _ in range(ID_PROOF_SAMPLE)]
    intake.track(sessions, [o.id for o in more], clock.now())
    seen_as(sessions, {o.id: datetime.fromtimestamp(o.created_at, UTC) for o in more})
    assert proven(sessions, clock)


def test_random_ids_carry_no_time(
    sessions: sessionmaker[Session], sandbox: SandboxServer, clock: FakeClock
) -> None:
    ops = sandbox.simulation.add_operations(ID_PROOF_SAMPLE, created_at=clock.now().timestamp())
    intake.track(sessions, [o.id for o in ops], clock.now())
    seen_as(sessions, {o.id: clock.now() for o in ops})
    assert not proven(sessions, clock)
