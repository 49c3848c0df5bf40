"""The request budget on SQLite and PostgreSQL: one slot every 1/rate s, shared by clients."""

from __future__ import annotations

from itertools import pairwise

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID
from worker.account import DbBudget
from worker.clock import FakeClock
from worker.errors import RetryLater
from worker.sandbox import SandboxServer


def test_slots_are_spaced_by_the_rate_and_a_long_wait_takes_no_slot(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    engine = sessions.kw["bind"]
    a, b = DbBudget(engine, SID, rate=4), DbBudget(engine, SID, rate=4)  # two processes
    now = clock.now()
    waits = [budget.reserve(now, max_wait=5.0) for budget in (a, b, a, b)]
    assert waits == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(RetryLater) as raised:
        a.reserve(now, max_wait=0.9)  # the next slot is 1 s away
    assert (raised.value.not_before - now).total_seconds() == 1.0
    assert b.reserve(now, max_wait=5.0) == 1.0  # the refused call took nothing
    clock.advance(60)  # an idle budget does not bank a burst
    assert [a.reserve(clock.now(), 5.0) for _ in range(2)] == [0.0, 0.25]


def test_the_client_waits_for_its_slot_before_each_request(
    sessions: sessionmaker[Session], sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    op = sandbox.add_operation(total=4, duration=100)
    client = make_client()
    client.budget = DbBudget(sessions.kw["bind"], SID, rate=2)
    for _ in range(3):
        client.fetch(op.id)
    assert clock.slept == [0.0, 0.5, 0.5]
    times = [r["t"] for r in sandbox.requests_log()]
    assert [round(b - a, 3) for a, b in pairwise(times)] == [0.5, 0.5]
