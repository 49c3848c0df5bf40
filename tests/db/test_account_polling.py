"""Two accounts in one deployment: each operation polled with its own account's credentials,
groups that never mix accounts, and a pause of one that never holds the other back.

The sandbox serves both accounts (each its own operations, faults and request log), so what
each account was asked is read from its own log.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import timedelta

import pytest
from cryptography.fernet import Fernet
from sqlalchemy import select

from tests.support.services import SID, TOKEN
from worker import health, intake, sweep
from worker.accounts import Accounts
from worker.clock import FakeClock
from worker.credentials import Vault
from worker.db import PollGroup, TrackedOperation
from worker.errors import TrackedElsewhere, UnknownAccount
from worker.repository import GroupClaim
from worker.runtime import Runtime
from worker.sandbox import Fault, SandboxServer
from worker.sandbox.server import SandboxAccount
from worker.settings import load_settings

ACME_SID = "AC" + "ac" * 16
ACME_KEY = "SK" + "ac" * 16
ACME_SECRET = "acme-key-secret-0123456789"
KEY = Fernet.generate_key().decode()


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
        "OPTRACK_POLL_STRATEGY": "fetch",
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


def tick(rt: Runtime) -> list[GroupClaim]:
    """Beat's tick: place, then claim what is due except the paused accounts' groups."""
    sent: list[GroupClaim] = []
    now = rt.clock.now()
    sweep.sweep(
        rt.sessions,
        now,
        rt.poll_policy,
        limit=100,
        paused_until=None,
        paused=frozenset(rt.paused_accounts(now)),
        send=sent.append,
    )
    return sent


def poll(rt: Runtime, claims: list[GroupClaim]) -> None:
    for claim in claims:
        rt.poller.poll(claim.group_id, claim.token)


def fetched(log: list[dict[str, object]]) -> list[str]:
    """The operation IDs an account's request log shows fetched."""
    return [str(e["path"]).rsplit("/", 1)[1] for e in log if "/Operations/" in str(e["path"])]


def test_each_operation_is_polled_with_its_own_accounts_credentials(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    mine = sandbox.add_operation(total=10, duration=600)
    theirs = acme.add_operation(total=20, duration=600)
    intake.track(rt.sessions, [mine.id], clock.now())
    intake.track(rt.sessions, [theirs.id], clock.now(), "acme")

    poll(rt, tick(rt))
    sweep.place(rt.sessions, clock.now(), rt.poll_policy)  # first sights placed by createdAt

    with rt.sessions() as session:
        ops = {op.id: op for op in session.scalars(select(TrackedOperation))}
        groups = {g.id: g.account for g in session.scalars(select(PollGroup))}
    assert {op.id: (op.account, op.status, op.total) for op in ops.values()} == {
        mine.id: ("default", "PROCESSING", 10),
        theirs.id: ("acme", "PROCESSING", 20),
    }
    # A group holds one account's operations only.
    for op in ops.values():
        assert groups[op.group_id] == op.account  # type: ignore[index]
    # Each account was asked for its own operation only (a 404 or 401 would show otherwise).
    assert fetched(sandbox.requests_log()) == [mine.id]
    assert fetched(acme.requests_log()) == [theirs.id]
    assert {e["status"] for e in sandbox.requests_log() + acme.requests_log()} == {200}


def test_an_id_tracked_under_another_account_is_refused_naming_both(
    rt: Runtime, acme: SandboxAccount, clock: FakeClock
) -> None:
    theirs = acme.add_operation(total=5, duration=600)
    other = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
    intake.track(rt.sessions, [theirs.id], clock.now(), "acme")
    with pytest.raises(TrackedElsewhere) as info:
        intake.track(rt.sessions, [other, theirs.id], clock.now())
    message = str(info.value)
    assert (
        "account 'default'" in message and f"{theirs.id} is tracked under account 'acme'" in message
    )
    with rt.sessions() as session:  # nothing written: not even the other, new ID
        assert session.get(TrackedOperation, other) is None
    with pytest.raises(UnknownAccount):
        intake.track(rt.sessions, [other], clock.now(), "nobody")
    # The same account again is no conflict.
    assert intake.track(rt.sessions, [theirs.id], clock.now(), "acme").already_tracked == (
        theirs.id,
    )


def test_a_429_storm_on_one_account_leaves_the_other_polled_on_time(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    mine = sandbox.add_operation(total=10, duration=3600)
    theirs = acme.add_operation(total=10, duration=3600)
    intake.track(rt.sessions, [mine.id], clock.now())
    intake.track(rt.sessions, [theirs.id], clock.now(), "acme")
    poll(rt, tick(rt))
    acme.add_fault(Fault(kind="status", status=429, retry_after="600", count=1000))

    for _ in range(6):  # a minute: six intervals
        clock.advance(10)
        poll(rt, tick(rt))

    paused = rt.paused_accounts(clock.now())
    assert set(paused) == {"acme"}
    # acme was asked once more (its 429), then left alone during its pause.
    assert [e["status"] for e in acme.requests_log()] == [200, 429]
    # default's operation was asked every interval, all answered.
    statuses = [e["status"] for e in sandbox.requests_log()]
    assert statuses == [200] * 7
    assert rt.gate.paused_until(clock.now()) is None


def test_revoked_credentials_pause_their_account_alone(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    mine = sandbox.add_operation(total=10, duration=3600)
    theirs = acme.add_operation(total=10, duration=3600)
    intake.track(rt.sessions, [mine.id], clock.now())
    intake.track(rt.sessions, [theirs.id], clock.now(), "acme")
    poll(rt, tick(rt))
    sandbox.revoke(ACME_KEY)

    for _ in range(3):
        clock.advance(10)
        poll(rt, tick(rt))

    pause = rt.gate_for(ACME_SID).current()
    assert pause is not None and pause.credentials_rejected_at is not None
    assert rt.gate.current() is None  # the default account: nothing recorded
    assert [e["status"] for e in sandbox.requests_log()] == [200] * 4
    assert [e["status"] for e in acme.requests_log()][:2] == [200, 401]
    with rt.sessions() as session:  # `optrack health` names the account, and only it
        report = health.check(
            session,
            clock.now(),
            account_sid=SID,
            max_beat_age=timedelta(days=1),
            max_lag=timedelta(days=1),
        )
    [problem] = [p for p in report.problems if "credentials" in p]
    assert problem.endswith("(account acme)")
    assert "optrack accounts set-secret acme" in problem
    assert ACME_SECRET not in problem

    # A rotated secret is used from the next poll, and clears the rejection once answered.
    sandbox.restore("SK" + "cd" * 16, "rotated-secret-42", ACME_SID)
    with rt.sessions.begin() as session:
        sealed = Vault((KEY,)).seal("rotated-secret-42")
        Accounts(session).set_secret("acme", sealed, "SK" + "cd" * 16, clock.now())
    clock.advance(timedelta(minutes=2).total_seconds())
    poll(rt, tick(rt))
    assert acme.requests_log()[-1]["status"] == 200
    pause = rt.gate_for(ACME_SID).current()
    assert pause is not None and pause.credentials_rejected_at is None


def test_each_account_has_its_own_request_budget(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    with rt.sessions.begin() as session:
        Accounts(session).set_budget("acme", 0.2)  # one request every 5 s, acme's alone
    mine = [sandbox.add_operation(total=10, duration=3600) for _ in range(3)]
    theirs = [acme.add_operation(total=10, duration=3600) for _ in range(3)]
    intake.track(rt.sessions, [op.id for op in mine], clock.now())
    intake.track(rt.sessions, [op.id for op in theirs], clock.now(), "acme")

    for _ in range(12):
        poll(rt, tick(rt))
        clock.advance(1)

    acme_times = [float(e["t"]) for e in acme.requests_log()]
    gaps = [b - a for a, b in itertools.pairwise(acme_times)]
    assert len(acme_times) >= 2 and all(gap >= 5.0 for gap in gaps), acme_times
    # The default account has no budget: its three operations were asked in the same second.
    first = [float(e["t"]) for e in sandbox.requests_log()][:3]
    assert len(first) == 3 and first[-1] - first[0] < 1.0
    assert rt.client_for("acme").budget is not None and rt.client.budget is None


def test_a_secret_no_key_opens_stops_only_its_own_account(
    rt: Runtime, sandbox: SandboxServer, acme: SandboxAccount, clock: FakeClock
) -> None:
    mine = sandbox.add_operation(total=10, duration=3600)
    theirs = acme.add_operation(total=10, duration=3600)
    intake.track(rt.sessions, [mine.id], clock.now())
    intake.track(rt.sessions, [theirs.id], clock.now(), "acme")
    # A worker started with another key (the one acme was sealed with is missing).
    other = Runtime(
        load_settings(
            {
                "OPTRACK_DATABASE_URL": rt.settings.database_url,
                "OPTRACK_API_BASE_URL": sandbox.base_url,
                "TWILIO_ACCOUNT_SID": SID,
                "TWILIO_AUTH_TOKEN": TOKEN,
                "OPTRACK_SECRET_KEY": Fernet.generate_key().decode(),
                "OPTRACK_POLL_STRATEGY": "fetch",
            }
        ),
        clock=clock,
    )
    try:
        poll(other, tick(other))
    finally:
        other.close()
    assert fetched(sandbox.requests_log()) == [mine.id]
    assert acme.requests_log() == []  # never asked with a wrong secret
    with rt.sessions() as session:
        groups = {g.account: g for g in session.scalars(select(PollGroup))}
    assert groups["acme"].next_due_at > clock.now()
    assert "OPTRACK_SECRET_KEY" in (groups["acme"].last_error or "")
    assert KEY not in (groups["acme"].last_error or "")
