"""Discovery on SQLite and PostgreSQL: every page, idempotent, and a 429 mid-way kept."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from urllib.parse import parse_qs

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.db.test_tracking import POLICY, make_poller, poll_all, tick
from tests.support.services import SID, TOKEN
from worker.account import DbGate
from worker.celery_app import DISCOVER_TASK, celery_config
from worker.clock import FakeClock
from worker.db import AccountPause, TrackedOperation
from worker.discovery import discover
from worker.reports.queries import operation_history
from worker.repository import Repository
from worker.sandbox import Fault, SandboxServer
from worker.settings import load_settings

WEEK = timedelta(days=7)


def tracked(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(TrackedOperation.id)))


def list_requests(sandbox: SandboxServer) -> list[dict[str, list[str]]]:
    return [
        parse_qs(entry["query"])
        for entry in sandbox.requests_log()
        if entry["path"].endswith("/SenderPools/Operations")
    ]


def seed(sandbox: SandboxServer, clock: FakeClock) -> list[str]:
    """Seven PROCESSING operations, two ended ones, one PROCESSING but older than a week."""
    now = clock.now().timestamp()
    processing = [
        sandbox.add_operation(total=10, duration=3600, created_at=now - 60 * i).id for i in range(7)
    ]
    sandbox.add_operation(total=1, duration=0, created_at=now - 30)  # COMPLETED
    sandbox.add_operation(total=4, duration=0, outcome="CANCELED", created_at=now - 20)
    sandbox.add_operation(total=10, duration=30 * 86400, created_at=now - 8 * 86400)
    return processing


def test_discovers_every_page_and_is_idempotent(
    sessions: sessionmaker[Session], sandbox: SandboxServer, make_client, clock: FakeClock
) -> None:  # type: ignore[no-untyped-def]
    processing = seed(sandbox, clock)
    client = make_client()

    result = discover(sessions, client, clock.now(), WEEK, page_size=3)

    assert result.complete and result.not_before is None
    assert set(result.added) == set(processing) and result.seen == 7
    assert tracked(sessions) == set(processing)
    pages = list_requests(sandbox)
    assert len(pages) == 3  # 3 + 3 + 1, following pagination.next
    assert all(p["status"] == ["PROCESSING"] and "startDate" in p for p in pages)
    assert "pageToken" not in pages[0] and all("pageToken" in p for p in pages[1:])

    again = discover(sessions, client, clock.now(), WEEK, page_size=3)
    assert again.added == () and again.already_tracked == 7
    assert tracked(sessions) == set(processing)


def test_a_429_mid_way_keeps_what_was_found_and_says_when_to_resume(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
) -> None:
    processing = seed(sandbox, clock)
    sandbox.add_fault(Fault(kind="slow", delay=0))  # the first page answers normally
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="30"))
    client = make_client(gate=db_gate)
    started = clock.now()

    result = discover(sessions, client, started, WEEK, page_size=3)

    assert not result.complete
    assert result.not_before == started + timedelta(seconds=30)
    assert "stopped early, not before" in result.summary()
    assert len(result.added) == 3 and set(result.added) <= set(processing)
    assert tracked(sessions) == set(result.added)  # the first page is kept
    with sessions() as session:
        pause = session.get(AccountPause, SID)
        assert pause is not None and pause.status_code == 429
    # Retry-After honored: the 429 was the last request; nothing was called during the pause.
    assert [e["status"] for e in sandbox.requests_log()] == [200, 429]

    # Still paused: the next run calls nothing and keeps everything.
    clock.advance(10)
    early = discover(sessions, client, clock.now(), WEEK, page_size=3)
    assert early.not_before == started + timedelta(seconds=30) and early.seen == 0
    assert len(sandbox.requests_log()) == 2

    clock.advance(20)
    later = discover(sessions, client, clock.now(), WEEK, page_size=3)
    assert later.complete and later.already_tracked == 3 and len(later.added) == 4
    assert tracked(sessions) == set(processing)


def test_discovery_out_of_time_keeps_what_it_found(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
) -> None:
    """A 429 waited in place (3 s on the fake clock) takes the listing past its deadline: it
    stops there and keeps the pages it read. Before, it listed on until Celery's soft time
    limit stopped the task mid-request, and everything found was thrown away."""
    processing = seed(sandbox, clock)
    sandbox.add_fault(Fault(kind="slow", delay=0))  # the first page answers normally
    sandbox.add_fault(Fault(kind="status", status=429, retry_after="3"))
    client = make_client(gate=db_gate)
    started = clock.now()

    result = discover(
        sessions,
        client,
        started,
        WEEK,
        page_size=3,
        deadline=started + timedelta(seconds=2),
        clock=clock,
    )

    assert result.stopped_early == "out of time; the next run lists again"
    assert clock.now() >= started + timedelta(seconds=3)  # waited out the 429 in place
    assert 3 < len(result.added) < 7 and set(result.added) <= set(processing)
    assert tracked(sessions) == set(result.added)
    assert [e["status"] for e in sandbox.requests_log()] == [200, 429, 200]  # no third page


@pytest.mark.parametrize(
    ("offset", "date_offset"),
    [(30 * 86400, 0.0), (600, 600.0)],
    ids=["30_days_ahead", "10_minutes_fast_node_date_too"],
)
def test_discovery_never_records_an_updated_at_ahead_of_the_clocks(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    db_gate: DbGate,
    clock: FakeClock,
    offset: float,
    date_offset: float,
) -> None:
    """The rule polls apply (OPTRACK_CLOCK_ALLOWANCE), applied to a listing's first sight."""
    op = sandbox.add_operation(total=10, duration=100)
    clock.advance(30)
    listing = Fault("future_updated_at", offset=offset, date_offset=date_offset, match="status=")
    sandbox.add_fault(listing)
    client = make_client(gate=db_gate)

    assert discover(sessions, client, clock.now(), WEEK).added == (op.id,)

    with sessions() as session:
        first = Repository(session).get(op.id)
        assert first is not None and first.created == 3  # its counts are recorded ...
        assert first.remote_updated_at is not None
        assert first.remote_updated_at <= clock.now()  # ... not its updatedAt
    clock.advance(POLICY.interval.total_seconds())
    poll_all(make_poller(sessions, client), tick(sessions, clock))
    with sessions() as session:  # what `optrack history` shows
        rows = operation_history(session, op.id, clock.now()).rows
    assert [r.seq for r in rows] == [1, 2] and rows[1].created == 4
    assert rows[0].remote_updated_at <= rows[1].remote_updated_at <= clock.now()
    assert rows[1].elapsed_seconds is not None and rows[1].elapsed_seconds >= 0


def test_discovery_trusts_an_updated_at_within_the_allowance_it_is_given(
    sessions: sessionmaker[Session],
    sandbox: SandboxServer,
    make_client,  # type: ignore[no-untyped-def]
    clock: FakeClock,
) -> None:
    op = sandbox.add_operation(total=10, duration=100)
    sandbox.add_fault(Fault("future_updated_at", offset=600, match="status="))
    hour = timedelta(hours=1)
    discover(sessions, make_client(), clock.now(), WEEK, clock_allowance=hour)
    with sessions() as session:
        first = Repository(session).get(op.id)
        assert first is not None and first.remote_updated_at is not None
        assert first.remote_updated_at > clock.now() + timedelta(seconds=599)


def test_the_beat_entry_is_opt_in() -> None:
    base = {"OPTRACK_DATABASE_URL": "sqlite:///x.sqlite", "OPTRACK_BROKER_URL": "redis://r"}
    assert "optrack-discover" not in celery_config(load_settings(base))["beat_schedule"]
    on = celery_config(load_settings({**base, "OPTRACK_DISCOVERY_INTERVAL": "600"}))
    entry = on["beat_schedule"]["optrack-discover"]
    assert entry["task"] == DISCOVER_TASK and entry["schedule"] == 600.0


def _env(db_url: str, base_url: str, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_API_BASE_URL=base_url,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    return env


@pytest.mark.slow
def test_cli_discover_once_and_stopped_early(
    db_url: str, sessions: sessionmaker[Session], sandbox: SandboxServer, tmp_path: Path
) -> None:
    env = _env(db_url, sandbox.base_url, tmp_path)
    ops = [sandbox.add_operation(total=5, duration=3600).id for _ in range(3)]
    run = [sys.executable, "-m", "worker", "discover", "--window", "1d", "--page-size", "2"]

    done = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "3 PROCESSING operation(s) listed: 3 newly tracked" in done.stdout
    assert tracked(sessions) == set(ops)

    sandbox.add_fault(Fault(kind="status", status=429, retry_after="120"))
    stopped = subprocess.run(run, env=env, capture_output=True, text=True, timeout=60)
    assert stopped.returncode == 1
    assert "stopped early, not before" in stopped.stderr
    assert TOKEN not in stopped.stdout + stopped.stderr
