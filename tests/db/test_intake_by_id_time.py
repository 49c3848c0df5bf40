"""Intake by the ID's time, on SQLite and PostgreSQL against the sandbox: once an account's
IDs are proven to carry their creation time (against the createdAt its operations showed), a
new operation joins the List window that covers its ID's time and costs no request of its
own; an account whose IDs do not carry it is placed as before, and a wrong guess still ends
recorded, by the fallback GET.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from tests.db.test_intake_listing import POLICY, calls, rows, tick_and_poll
from worker import intake, sweep
from worker.account import DbGate
from worker.clock import FakeClock
from worker.db import PollGroup, TrackedOperation
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import ID_PROOF_MIN, ID_PROOF_SAMPLE, Repository
from worker.sandbox import SandboxServer
from worker.sandbox.simulation import SimulatedOperation, new_operation_id


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    client = make_client(gate=db_gate)
    return Poller(sessions, client, POLICY, client.clock, Recorder(sessions, POLICY))


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


def bounds(log: list[dict[str, object]]) -> list[tuple[datetime, datetime]]:
    """The [startDate, endDate] of every List request of a log."""
    found = []
    for entry in log:
        query = parse_qs(str(entry["query"]))
        if "startDate" in query:
            start, end = (
                datetime.fromisoformat(query[k][0].replace("Z", "+00:00"))
                for k in ("startDate", "endDate")
            )
            found.append((start, end))
    return found


def created(op: SimulatedOperation) -> datetime:
    return datetime.fromtimestamp(op.created_second, UTC)


def an_hour_ago_window(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> PollGroup:
    """25 operations created from 70 to 52 minutes ago, handed over now and seen: one List
    window over their createdAt. The sandbox's request log is cleared."""
    start = clock.now() - timedelta(minutes=70)
    old = [
        sandbox.add_operation(
            total=10, duration=100_000, created_at=(start + timedelta(seconds=45 * i)).timestamp()
        )
        for i in range(25)
    ]
    intake.track(sessions, [o.id for o in old], clock.now())
    tick_and_poll(sessions, poller, clock)  # never seen: the recent minute, then the day
    sweep.place(sessions, clock.now(), POLICY)  # seen: placed by createdAt
    with sessions() as session:
        [window] = session.scalars(select(PollGroup)).all()
    assert window.kind == "list" and window.members == 25
    assert (window.start_at, window.end_at) == (created(old[0]), created(old[-1]))
    sandbox.clear_requests()
    return window


def hand_over_late(
    sessions: sessionmaker[Session], sandbox: SandboxServer, clock: FakeClock
) -> list[SimulatedOperation]:
    """Six operations created over the minute an hour ago, handed over a second from now."""
    hour_ago = clock.now() - timedelta(hours=1)
    late = [
        sandbox.add_operation(
            total=10, duration=100_000, created_at=(hour_ago + timedelta(seconds=7 * i)).timestamp()
        )
        for i in range(6)
    ]
    clock.advance(1)
    intake.track(sessions, [o.id for o in late], clock.now())
    return late


def test_operations_handed_over_an_hour_late_join_the_window_of_their_id_time(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:
    sandbox.simulation.ulid_ids = True
    window = an_hour_ago_window(sessions, sandbox, poller, clock)
    assert proven(sessions, clock)
    late = hand_over_late(sessions, sandbox, clock)

    tick_and_poll(sessions, poller, clock)  # placed into the window, not yet due: no request
    assert calls(sandbox.requests_log()) == []
    assert {rows(sessions)[o.id].group_id for o in late} == {window.id}
    clock.advance(POLICY.interval.total_seconds())
    tick_and_poll(sessions, poller, clock)

    # The window's own page showed them: no GET, no listing of the day or of the recent minute.
    assert calls(sandbox.requests_log()) == ["list"]
    assert window.start_at is not None and window.end_at is not None
    pad = timedelta(seconds=1)
    assert bounds(sandbox.requests_log()) == [(window.start_at - pad, window.end_at + pad)]
    stored = rows(sessions)
    assert all(stored[o.id].remote_created_at == created(o) for o in late)
    assert all(stored[o.id].status == "PROCESSING" for o in late)


def test_an_account_whose_ids_carry_no_time_is_placed_as_before(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:
    window = an_hour_ago_window(sessions, sandbox, poller, clock)  # random IDs
    assert not proven(sessions, clock)
    late = hand_over_late(sessions, sandbox, clock)

    tick_and_poll(sessions, poller, clock)

    # A window of their own, listed at once: the recent minute, then the day (fewer pages
    # than their GETs), as before.
    assert calls(sandbox.requests_log()) == ["list", "list"]
    recent, day = bounds(sandbox.requests_log())
    assert recent[0] > clock.now() - timedelta(minutes=2)
    assert day[0] < clock.now() - timedelta(hours=23)
    stored = rows(sessions)
    assert all(stored[o.id].remote_created_at == created(o) for o in late)
    assert window.id not in {stored[o.id].group_id for o in late}


def test_many_wrong_guesses_are_recorded_by_the_day_listing(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:
    sandbox.simulation.ulid_ids = True
    window = an_hour_ago_window(sessions, sandbox, poller, clock)
    hour_ago = (clock.now() - timedelta(hours=1)).timestamp()
    three_hours_ago = (clock.now() - timedelta(hours=3)).timestamp()
    rng = random.Random(7)
    wrong = [
        sandbox.add_operation(
            op_id=new_operation_id(rng, created_at=hour_ago + i),
            total=4,
            duration=100_000,
            created_at=three_hours_ago,
        )
        for i in range(6)
    ]
    clock.advance(1)
    intake.track(sessions, [o.id for o in wrong], clock.now())
    tick_and_poll(sessions, poller, clock)
    assert {rows(sessions)[o.id].group_id for o in wrong} == {window.id}
    clock.advance(POLICY.interval.total_seconds())

    tick_and_poll(sessions, poller, clock)

    # The window's page did not show them; the day's window (by their tracking, not the
    # guess) costs fewer pages than their GETs and did.
    assert calls(sandbox.requests_log()) == ["list", "list"]
    own, day = bounds(sandbox.requests_log())
    assert window.start_at is not None and own[0] == window.start_at - timedelta(seconds=1)
    assert day[0] < clock.now() - timedelta(hours=23) and day[1] > clock.now() - timedelta(
        minutes=1
    )
    stored = rows(sessions)
    assert all(stored[o.id].remote_created_at == created(o) for o in wrong)


def test_a_wrong_guess_is_recorded_by_the_fallback_get(
    sessions: sessionmaker[Session], sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:
    sandbox.simulation.ulid_ids = True
    window = an_hour_ago_window(sessions, sandbox, poller, clock)
    assert proven(sessions, clock)
    # An ID minted with a time inside the window, for an operation created 3 hours ago.
    hour_ago = (clock.now() - timedelta(hours=1)).timestamp()
    three_hours_ago = (clock.now() - timedelta(hours=3)).timestamp()
    op_id = new_operation_id(random.Random(7), created_at=hour_ago)
    wrong = sandbox.add_operation(
        op_id=op_id, total=4, duration=100_000, created_at=three_hours_ago
    )
    clock.advance(1)
    intake.track(sessions, [wrong.id], clock.now())
    tick_and_poll(sessions, poller, clock)
    assert rows(sessions)[wrong.id].group_id == window.id  # the guess placed it there
    clock.advance(POLICY.interval.total_seconds())

    tick_and_poll(sessions, poller, clock)

    # The window's page did not show it: one GET did, and it is recorded as it is.
    log = sandbox.requests_log()
    assert calls(log) == ["list", "fetch"]
    assert str(log[1]["path"]).endswith(wrong.id)
    stored = rows(sessions)[wrong.id]
    assert stored.remote_created_at == created(wrong)
    assert stored.status == "PROCESSING" and stored.total == 4
    assert not proven(sessions, clock)  # seen, it withdraws the proof
