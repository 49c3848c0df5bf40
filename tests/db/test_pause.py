"""The account pause shared by every process: re-read after waiting, jittered wake-ups, the
throttle count in the pause row, and a pause that survives a database that cannot be written.

Two ``DbGate`` objects on one database are two processes; the sandbox's request log and the
fake clock are the witnesses.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from tests.support.services import SID, TOKEN
from worker.account import DbGate
from worker.client import ApiClient, LocalGate, Timeouts
from worker.clock import FakeClock
from worker.db import AccountPause, make_engine
from worker.errors import RetryLater
from worker.migrate import upgrade
from worker.retry_after import RetryPolicy
from worker.sandbox import Fault, SandboxServer

MISSING = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"


def api_requests(sandbox: SandboxServer) -> list[dict[str, object]]:
    return [r for r in sandbox.requests_log() if str(r["path"]).startswith("/v1/")]


class ClockWithNeighbour(FakeClock):
    """A fake clock on which another process acts while this one sleeps."""

    def __init__(self, start: datetime, during_sleep: Callable[[], None]) -> None:
        super().__init__(start)
        self.during_sleep: Callable[[], None] | None = during_sleep

    def sleep(self, seconds: float) -> None:
        super().sleep(seconds)
        action, self.during_sleep = self.during_sleep, None
        if action is not None:
            action()


def client_on(sandbox: SandboxServer, gate: object, clock: FakeClock, seed: int = 0) -> ApiClient:
    return ApiClient(
        sandbox.base_url,
        SID,
        TOKEN,
        timeouts=Timeouts(connect=2, read=2, deadline=10),
        policy=RetryPolicy(max_inplace_wait=5.0),
        gate=gate,  # type: ignore[arg-type]
        clock=clock,
        rng=random.Random(seed),
    )


def test_an_in_place_wait_looks_again_before_sending(
    sandbox: SandboxServer, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    engine = sessions.kw["bind"]
    other = DbGate(engine, SID, clock)  # another worker process
    other.pause(clock.now() + timedelta(seconds=3), "HTTP 429 elsewhere", 429)
    # While this worker sleeps out the 3 s, the other one gets a Retry-After of 122 s.
    neighbour = ClockWithNeighbour(
        clock.now(),
        lambda: other.pause(clock.now() + timedelta(seconds=122), "HTTP 429 (longer)", 429),
    )
    client = client_on(sandbox, DbGate(engine, SID, neighbour), neighbour)
    with client, pytest.raises(RetryLater) as info:
        client.fetch(MISSING)
    assert info.value.not_before == clock.now() + timedelta(seconds=122)
    assert len(neighbour.slept) == 1 and api_requests(sandbox) == []  # nothing sent at t=3


def test_processes_waiting_out_one_pause_wake_at_different_instants(
    sandbox: SandboxServer, clock: FakeClock
) -> None:
    op = sandbox.add_operation(total=1, duration=60)
    gate = LocalGate()
    gate.pause(clock.now() + timedelta(seconds=4), "HTTP 429", 429)
    wakes = []
    for seed in range(6):
        own = FakeClock(clock.now())
        with client_on(sandbox, gate, own, seed) as client:
            assert client.fetch(op.id).id == op.id
        [slept] = own.slept
        assert 4.0 <= slept <= 5.0  # a jitter of at most a quarter of the wait, and 1 s
        wakes.append(slept)
    assert len(set(wakes)) == len(wakes)


def test_the_throttle_count_is_shared_and_a_200_resets_it(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    engine = sessions.kw["bind"]
    first, second = DbGate(engine, SID, clock), DbGate(engine, SID, clock)
    now = clock.now()
    assert [first.count_throttle(now, 429), second.count_throttle(now, 503)] == [1, 2]
    assert first.count_throttle(now, 429) == 3
    second.paused_until(now)  # every request reads the row first, and with it the count
    second.answered_ok(now)
    assert first.count_throttle(now, 429) == 1
    with sessions() as session:
        row = session.get(AccountPause, SID)
        assert row is not None and row.consecutive_throttles == 1
        assert row.paused_until <= now  # counting throttles pauses nothing by itself


def test_a_retry_after_zero_storm_grows_across_processes(
    sandbox: SandboxServer, sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    engine = sessions.kw["bind"]
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="0", count=50))
    first = client_on(sandbox, DbGate(engine, SID, clock), clock, 1)
    with first, pytest.raises(RetryLater) as info:
        first.fetch(MISSING)
    asked = len(api_requests(sandbox))
    assert asked <= 4
    clock.current = info.value.not_before
    # Another process after the pause: its first wait continues the account's count.
    second = client_on(sandbox, DbGate(engine, SID, clock), clock, 2)
    with second, pytest.raises(RetryLater) as later:
        second.fetch(MISSING)
    assert len(api_requests(sandbox)) == asked + 1
    assert (later.value.not_before - clock.now()).total_seconds() >= 2.0**asked
    sandbox.clear_faults()
    clock.current = later.value.not_before
    with client_on(sandbox, DbGate(engine, SID, clock), clock, 3) as third:
        op = sandbox.add_operation(total=1, duration=60)
        assert third.fetch(op.id).id == op.id  # a 200: the count starts again
    with sessions() as session:
        row = session.get(AccountPause, SID)
        assert row is not None and row.consecutive_throttles == 0


def test_an_unreachable_database_does_not_lose_the_pause(
    sandbox: SandboxServer, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    down = create_engine("postgresql+psycopg://postgres@127.0.0.1:1/none", poolclass=NullPool)
    gate = DbGate(down, SID, clock)
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="60"))
    client = client_on(sandbox, gate, clock)
    with caplog.at_level(logging.WARNING, logger="worker.account"), client:
        with pytest.raises(RetryLater) as first:
            client.fetch(MISSING)
        clock.advance(30)
        with pytest.raises(RetryLater) as second:  # still paused, by this process
            client.fetch(MISSING)
    assert first.value.not_before == second.value.not_before
    assert [r["status"] for r in api_requests(sandbox)] == [429]  # the 429 was not forgotten
    assert "this process honors its own pauses" in caplog.text
    down.dispose()


def test_a_pause_written_while_the_database_was_away_is_written_when_it_is_back(
    tmp_path: Path, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "optrack.sqlite"
    upgrade(f"sqlite:///{path}")
    engine = make_engine(f"sqlite:///{path}", poolclass=NullPool)
    gate = DbGate(engine, SID, clock)
    until = clock.now() + timedelta(seconds=90)
    os.rename(path, tmp_path / "away.sqlite")  # the next connection finds no table
    with caplog.at_level(logging.INFO, logger="worker.account"):
        gate.pause(until, "HTTP 429 (Retry-After 90)", 429)
        assert gate.paused_until(clock.now()) == (until, "HTTP 429 (Retry-After 90)")
        os.replace(tmp_path / "away.sqlite", path)
        clock.advance(5)
        assert gate.paused_until(clock.now()) == (until, "HTTP 429 (Retry-After 90)")
    other = DbGate(engine, SID, clock)  # another process sees it now
    assert other.paused_until(clock.now()) == (until, "HTTP 429 (Retry-After 90)")
    assert "written to the database" in caplog.text
    engine.dispose()
