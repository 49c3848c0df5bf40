"""Rejected credentials are a fact of their own, not the status code of the last pause: a
longer 429 pause, before or after the 401, hides it from none of `optrack health`, `optrack
status` and the metrics; only a 200 to a request sent after it clears it (issue 18).

Real clients on the sandbox, two ``DbGate`` objects for two processes, the fake clock.
"""

from __future__ import annotations

import os
import random
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from tests.support.services import SID, TOKEN
from worker import health
from worker.account import DbGate
from worker.cli.render import pause_line
from worker.client import ApiClient, Timeouts
from worker.clock import FakeClock
from worker.db import AccountPause, make_engine
from worker.errors import AuthError, RetryLater
from worker.migrate import upgrade
from worker.reports.formats import account_record
from worker.retry_after import RetryPolicy
from worker.sandbox import Fault, SandboxServer

HOUR = timedelta(hours=1)


def client(sandbox: SandboxServer, gate: DbGate, clock: FakeClock, token: str) -> ApiClient:
    return ApiClient(
        sandbox.base_url,
        SID,
        token,
        timeouts=Timeouts(connect=2, read=2, deadline=10),
        policy=RetryPolicy(max_inplace_wait=5.0),
        gate=gate,
        clock=clock,
        rng=random.Random(0),
    )


def what_is_said(sessions: sessionmaker[Session], clock: FakeClock) -> dict[str, object]:
    """What `optrack health`, `optrack status` (text and JSON) and a metrics scrape say."""
    now = clock.now()
    with sessions() as session:
        report = health.check(session, now, account_sid=SID, max_beat_age=HOUR, max_lag=HOUR)
        gauges = health.gauges(session, SID, now)
        row = session.get(AccountPause, SID)
    return {
        "health": [p for p in report.problems if "credentials" in p],
        "metric": gauges.credentials_rejected,
        "json": account_record(row, now)["credentials_rejected"],
        "status": pause_line(row, now) or "",
    }


def assert_rejected(said: dict[str, object], status: int) -> None:
    (problem,) = said["health"]  # type: ignore[misc]
    assert f"HTTP {status}: credentials rejected" in problem, problem
    assert said["metric"] is True and said["json"] is True
    assert "credentials rejected" in str(said["status"]).lower() and TOKEN not in str(said)


def test_a_401_then_an_hour_of_429_still_says_the_credentials_are_rejected(
    sandbox: SandboxServer, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=2, duration=3600)
    engine = sessions.kw["bind"]
    wrong = client(sandbox, DbGate(engine, SID, clock), clock, "not-the-token")
    with wrong, pytest.raises(AuthError):
        wrong.fetch(op.id)
    assert_rejected(what_is_said(sessions, clock), 401)

    clock.advance(61)  # the 401's own pause ran out; an hour of 429 overwrites the pause row
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="3600"))
    other = client(sandbox, DbGate(engine, SID, clock), clock, TOKEN)
    with other, pytest.raises(RetryLater) as paused:
        other.fetch(op.id)
    assert paused.value.not_before == clock.now() + HOUR
    said = what_is_said(sessions, clock)
    assert_rejected(said, 401)
    assert "Polling paused until" in str(said["status"])  # the 429's pause
    assert "Credentials rejected at" in str(said["status"])  # and the 401
    clock.advance(1800)
    assert_rejected(what_is_said(sessions, clock), 401)

    clock.advance(1801)  # the pause is over: the next answer is a 200, the credentials work
    with client(sandbox, DbGate(engine, SID, clock), clock, TOKEN) as fixed:
        assert fixed.fetch(op.id).id == op.id
    assert what_is_said(sessions, clock) == {
        "health": [],
        "metric": False,
        "json": False,
        "status": "",
    }


def test_a_401_during_a_longer_429_pause_is_not_dropped(
    sandbox: SandboxServer, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=2, duration=3600)
    engine = sessions.kw["bind"]
    throttled, rejected = DbGate(engine, SID, clock), DbGate(engine, SID, clock)
    # Both processes read no pause and send; the 429 (an hour) is written first.
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="3600"))
    with client(sandbox, throttled, clock, TOKEN) as first, pytest.raises(RetryLater):
        first.fetch(op.id)
    # The other one's 401 arrives while that pause runs: a pause of 60 s, shorter than it.
    rejected.pause(clock.now() + timedelta(seconds=60), "HTTP 403: credentials rejected", 403)
    paused = throttled.paused_until(clock.now())
    assert paused is not None and paused[0] == clock.now() + HOUR  # the longer pause holds
    assert_rejected(what_is_said(sessions, clock), 403)


def test_only_a_200_to_a_request_sent_after_the_rejection_clears_it(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    engine = sessions.kw["bind"]
    late, gate = DbGate(engine, SID, clock), DbGate(engine, SID, clock)
    sent_before = clock.now()
    clock.advance(1)
    gate.pause(clock.now() + timedelta(seconds=60), "HTTP 401: credentials rejected", 401)
    late.paused_until(clock.now())  # every request reads the row first
    late.answered_ok(sent_before)  # a 200 to a request that left before the 401's
    assert_rejected(what_is_said(sessions, clock), 401)
    clock.advance(61)
    late.paused_until(clock.now())
    late.answered_ok(clock.now())
    assert what_is_said(sessions, clock)["health"] == []


def test_a_rejection_recorded_while_the_database_was_away_is_written_after_its_pause(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "optrack.sqlite"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}", poolclass=NullPool)
    gate = DbGate(engine, SID, clock)
    os.rename(path, tmp_path / "away.sqlite")  # the next connection finds no table
    gate.pause(clock.now() + timedelta(seconds=60), "HTTP 401: credentials rejected", 401)
    gate.pause(clock.now() + HOUR, "HTTP 429 (Retry-After 3600)", 429)
    os.replace(tmp_path / "away.sqlite", path)
    clock.advance(120)  # the 401's pause ran out before the database was back
    assert gate.paused_until(clock.now()) is not None  # the 429's still runs: written now
    sessions = sessionmaker(engine)
    assert_rejected(what_is_said(sessions, clock), 401)
    engine.dispose()
