"""Intake by List, on SQLite and PostgreSQL against the sandbox: operations handed over just
after their creation are found by one List page over the recent window, not a GET each; the
ones that page does not show fall back as before (the day's window if it pays, else a GET).
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qs

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID, TOKEN
from worker import intake, sweep
from worker.account import DbGate
from worker.accounts import Accounts
from worker.clock import FakeClock
from worker.credentials import Vault
from worker.db import PollGroup, TrackedOperation
from worker.poller import Poller
from worker.recorder import Recorder
from worker.repository import GroupClaim
from worker.runtime import Runtime
from worker.sandbox import SandboxServer
from worker.sandbox.server import SandboxAccount
from worker.settings import load_settings
from worker.tracking import PollPolicy

POLICY = PollPolicy(
    interval=timedelta(seconds=10),
    max_interval=timedelta(seconds=10),
    lease=timedelta(seconds=60),
    list_threshold=5,
    intake_lookback=timedelta(seconds=60),
)
ACME_SID = "AC" + "ac" * 16
ACME_KEY = "SK" + "ac" * 16
ACME_SECRET = "acme-key-secret-0123456789"
KEY = Fernet.generate_key().decode()


@pytest.fixture
def poller(sessions, make_client, db_gate: DbGate) -> Poller:  # type: ignore[no-untyped-def]
    client = make_client(gate=db_gate)
    return Poller(sessions, client, POLICY, client.clock, Recorder(sessions, POLICY))


def tick_and_poll(
    sessions: sessionmaker[Session], poller: Poller, clock: FakeClock, policy: PollPolicy = POLICY
) -> None:
    """One tick and every poll it dispatched."""
    claims: list[GroupClaim] = []
    sweep.sweep(sessions, clock.now(), policy, limit=10_000, paused_until=None, send=claims.append)
    for claim in claims:
        poller.poll(claim.group_id, claim.token)


def calls(log: list[dict[str, object]]) -> list[str]:
    return ["list" if str(r["path"]).endswith("/Operations") else "fetch" for r in log]


def start_dates(log: list[dict[str, object]]) -> list[datetime]:
    """The startDate of every List request of a log."""
    found = []
    for entry in log:
        query = parse_qs(str(entry["query"]))
        if "startDate" in query:
            found.append(datetime.fromisoformat(query["startDate"][0].replace("Z", "+00:00")))
    return found


def rows(sessions: sessionmaker[Session]) -> dict[str, TrackedOperation]:
    with sessions() as session:
        return {r.id: r for r in session.scalars(select(TrackedOperation))}


def test_operations_handed_in_one_tick_cost_one_list_page_and_no_get(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    # 3,000 untracked operations from earlier today: the day's window would cost 4 pages.
    earlier = clock.now() - timedelta(hours=12)
    sandbox.simulation.add_operations(
        3000, total=10, duration=100_000, created_at=earlier.timestamp()
    )
    new = sandbox.simulation.add_operations(40, total=10, duration=600)
    clock.advance(1)  # handed over a second after their creation
    intake.track(sessions, [o.id for o in new], clock.now())

    tick_and_poll(sessions, poller, clock)

    assert calls(sandbox.requests_log()) == ["list"]  # one page, no GET
    [start] = start_dates(sandbox.requests_log())
    assert start >= clock.now() - POLICY.intake_lookback - timedelta(seconds=3)
    stored = rows(sessions)
    for op in new:
        created = datetime.fromtimestamp(op.created_second, UTC)
        assert stored[op.id].remote_created_at == created
        assert stored[op.id].status == "PROCESSING"
    # Seen, they are placed by createdAt: one window of the 40, polled by one page again.
    sweep.place(sessions, clock.now(), POLICY)
    with sessions() as session:
        [window] = session.scalars(select(PollGroup)).all()
    assert window.kind == "list" and window.members == 40


def test_a_stream_joins_the_newest_window_and_costs_no_request_of_its_own(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    first = sandbox.simulation.add_operations(20, total=10, duration=600)
    intake.track(sessions, [o.id for o in first], clock.now())
    tick_and_poll(sessions, poller, clock)  # the first intake: a window of their own
    sweep.place(sessions, clock.now(), POLICY)  # seen: placed by createdAt
    with sessions() as session:
        [window] = session.scalars(select(PollGroup)).all()
    clock.advance(3)
    later = sandbox.simulation.add_operations(12, total=10, duration=600)
    intake.track(sessions, [o.id for o in later], clock.now())
    sandbox.clear_requests()

    tick_and_poll(sessions, poller, clock)  # placed into the window, not yet due: no request
    assert calls(sandbox.requests_log()) == []
    assert {rows(sessions)[o.id].group_id for o in later} == {window.id}
    clock.advance(POLICY.interval.total_seconds())
    tick_and_poll(sessions, poller, clock)

    # The window's own page, listed on to their tracking, showed all 32: one request.
    assert calls(sandbox.requests_log()) == ["list"]
    stored = rows(sessions)
    assert all(stored[o.id].remote_created_at is not None for o in first + later)


def test_an_operation_tracked_hours_after_its_creation_falls_back_to_a_get(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    old = sandbox.add_operation(
        total=4, duration=100_000, created_at=(clock.now() - timedelta(hours=3)).timestamp()
    )
    new = sandbox.simulation.add_operations(10, total=4, duration=600)
    intake.track(sessions, [old.id, *(o.id for o in new)], clock.now())

    tick_and_poll(sessions, poller, clock)

    # The recent window showed the ten new ones; the old one alone is not worth a day's pages.
    assert calls(sandbox.requests_log()) == ["list", "fetch"]
    stored = rows(sessions)[old.id]
    assert stored.status == "PROCESSING" and stored.total == 4
    assert stored.remote_created_at == datetime.fromtimestamp(old.created_second, UTC)
    # Placed by its createdAt, it is asked again at its interval like any other.
    sweep.place(sessions, clock.now(), POLICY)
    clock.advance(POLICY.interval.total_seconds())
    sandbox.clear_requests()
    tick_and_poll(sessions, poller, clock)
    assert sorted(calls(sandbox.requests_log())) in (["list", "list"], ["fetch", "list"])
    assert rows(sessions)[old.id].group_id is not None


def test_many_operations_tracked_hours_late_are_listed_over_the_day(
    sessions, sandbox: SandboxServer, poller: Poller, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    three_hours_ago = (clock.now() - timedelta(hours=3)).timestamp()
    old = sandbox.simulation.add_operations(
        20, total=4, duration=100_000, created_at=three_hours_ago
    )
    intake.track(sessions, [o.id for o in old], clock.now())

    tick_and_poll(sessions, poller, clock)

    # The recent window holds none of them; the day's window costs one page, fewer than GETs.
    assert calls(sandbox.requests_log()) == ["list", "list"]
    recent, day = start_dates(sandbox.requests_log())
    assert recent > clock.now() - timedelta(minutes=2) and day < clock.now() - timedelta(hours=23)
    assert all(r.remote_created_at is not None for r in rows(sessions).values())


@pytest.fixture
def acme(sandbox: SandboxServer) -> SandboxAccount:
    """A second account of the sandbox, reached with an API key."""
    account = sandbox.add_account(ACME_SID, "acme-auth-token-unused")
    sandbox.add_api_key(ACME_SID, ACME_KEY, ACME_SECRET)
    return account


@pytest.fixture
def rt(db_url: str, sandbox: SandboxServer, clock: FakeClock) -> Iterator[Runtime]:
    env = {
        "OPTRACK_DATABASE_URL": db_url,
        "OPTRACK_API_BASE_URL": sandbox.base_url,
        "TWILIO_ACCOUNT_SID": SID,
        "TWILIO_AUTH_TOKEN": TOKEN,
        "OPTRACK_SECRET_KEY": KEY,
        "OPTRACK_POLL_INTERVAL": "10",
        "OPTRACK_MAX_INPLACE_WAIT": "0",
    }
    runtime = Runtime(load_settings(env), clock=clock)
    with runtime.sessions.begin() as session:
        Accounts(session).add(
            "acme", ACME_SID, ACME_KEY, Vault((KEY,)).seal(ACME_SECRET), clock.now()
        )
    yield runtime
    runtime.close()


def test_each_account_has_its_own_intake_listing(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    mine = sandbox.simulation.add_operations(8, total=10, duration=600)
    theirs = acme.simulation.add_operations(8, total=20, duration=600)
    intake.track(rt.sessions, [o.id for o in mine], clock.now())
    intake.track(rt.sessions, [o.id for o in theirs], clock.now(), "acme")

    claims: list[GroupClaim] = []
    sweep.sweep(
        rt.sessions, clock.now(), rt.poll_policy, limit=100, paused_until=None, send=claims.append
    )
    for claim in claims:
        rt.poller.poll(claim.group_id, claim.token)

    # One List page each, with each account's credentials (a 401 would show otherwise).
    assert calls(sandbox.requests_log()) == ["list"]
    assert calls(acme.requests_log()) == ["list"]
    assert {e["status"] for e in sandbox.requests_log() + acme.requests_log()} == {200}
    stored = rows(rt.sessions)
    assert {stored[o.id].account for o in mine} == {"default"}
    assert {stored[o.id].account for o in theirs} == {"acme"}
    assert all(r.remote_created_at is not None for r in stored.values())
