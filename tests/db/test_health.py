"""`optrack health` as compose runs it (a subprocess; exit codes), in each failing condition,
on SQLite and PostgreSQL; and the domain checks with an injected clock."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.support.services import SID, TOKEN
from worker import health
from worker.account import DbGate
from worker.clock import FakeClock
from worker.db import AccountPause, Heartbeat
from worker.repository import Repository

OP = "comms_operation_01h9krwprkeee8fzqspvwy6nq8"
MINUTE = timedelta(minutes=1)


def optrack_health(db_url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=db_url,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    return subprocess.run(
        [sys.executable, "-m", "worker", "health", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def healthy_state(sessions: sessionmaker[Session], now: datetime) -> None:
    """Beat ticked just now; one operation due in ten seconds."""
    with sessions.begin() as session:
        health.beat_ticked(session, now)
        Repository(session).add([OP], now + timedelta(seconds=10))


def pause(sessions: sessionmaker[Session], status: int, until: datetime) -> None:
    reason = f"HTTP {status}: credentials rejected; check TWILIO_*"
    rejected = status in (401, 403)
    with sessions.begin() as session:
        session.merge(
            AccountPause(
                account_sid=SID,
                paused_until=until,
                reason=reason,
                status_code=status,
                updated_at=until - timedelta(hours=1),
                credentials_rejected_at=until - timedelta(hours=1) if rejected else None,
                credentials_error=reason if rejected else None,
            )
        )


# The subprocess reads the real clock; every condition is hours away from its limit.
@pytest.mark.slow
def test_healthy_exits_0(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    healthy_state(sessions, datetime.now(UTC))
    pause(sessions, 429, datetime.now(UTC) + timedelta(hours=1))  # throttled is not unhealthy
    result = optrack_health(db_url, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: beat ticked")


@pytest.mark.slow
def test_beat_never_ticked(db_url: str, tmp_path: Path) -> None:
    result = optrack_health(db_url, tmp_path)
    assert result.returncode == 1
    assert "unhealthy: beat has never ticked" in result.stderr


@pytest.mark.slow
def test_beat_stopped_ticking(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    healthy_state(sessions, datetime.now(UTC))
    with sessions.begin() as session:
        row = session.get(Heartbeat, health.TICK)
        assert row is not None
        row.beat_at = datetime.now(UTC) - timedelta(hours=2)
    result = optrack_health(db_url, tmp_path, "--max-beat-age", "10m")
    assert result.returncode == 1
    assert "unhealthy: beat last ticked" in result.stderr
    assert "(more than 600s)" in result.stderr


@pytest.mark.slow
def test_polling_lags(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    healthy_state(sessions, now)
    with sessions.begin() as session:
        Repository(session).add([OP.replace("nq8", "nq9")], now - timedelta(hours=3))
    result = optrack_health(db_url, tmp_path, "--max-lag", "1h", "--json")
    assert result.returncode == 1
    assert "unhealthy: polling lags" in result.stderr
    assert '"lag_seconds": 10' in result.stdout  # about 10800 s, as JSON too


@pytest.mark.slow
def test_credentials_rejected(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    healthy_state(sessions, datetime.now(UTC))
    pause(sessions, 401, datetime.now(UTC) + timedelta(hours=1))
    result = optrack_health(db_url, tmp_path)
    assert result.returncode == 1
    assert "unhealthy: credentials rejected at" in result.stderr
    assert "HTTP 401: credentials rejected" in result.stderr
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.slow
def test_database_not_migrated_or_not_answering(tmp_path: Path) -> None:
    empty = optrack_health(f"sqlite:///{tmp_path / 'empty.sqlite'}", tmp_path)
    assert empty.returncode == 1
    assert "not migrated" in empty.stderr and "optrack db upgrade" in empty.stderr
    down = optrack_health("postgresql://optrack@127.0.0.1:1/optrack", tmp_path)
    assert down.returncode == 1
    assert "unhealthy: the database does not answer" in down.stderr


def test_check_judges_each_condition_at_an_injected_time(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    start = clock.now()

    def judge() -> health.HealthReport:
        with sessions() as session:
            return health.check(
                session, clock.now(), account_sid=SID, max_beat_age=MINUTE, max_lag=MINUTE
            )

    assert judge().problems == ("beat has never ticked (is `celery beat` running, and a worker?)",)
    healthy_state(sessions, start)
    assert judge().ok and judge().lag == 0.0

    clock.advance(70)  # the operation was due at start + 10 s: 60 s late, on the limit
    report = judge()
    assert [p.split(" ")[0:2] for p in report.problems] == [["beat", "last"]]
    assert report.lag == 60.0

    with sessions.begin() as session:
        health.beat_ticked(session, clock.now())
        health.beat_ticked(session, start)  # a late, redelivered tick does not go back
    clock.advance(1)
    assert judge().problems[0].startswith("polling lags 61s")

    pause(sessions, 403, clock.now() + MINUTE)
    assert any("HTTP 403" in p for p in judge().problems)
    clock.advance(61)  # the pause ran out, but no request was accepted since: still rejected
    assert any("HTTP 403" in p for p in judge().problems)
    gate = DbGate(sessions.kw["bind"], SID, clock)
    gate.paused_until(clock.now())  # a request reads the row, is sent and answered 200
    gate.answered_ok(clock.now())
    assert not any("HTTP 403" in p for p in judge().problems)


def test_compose_checks_worker_and_beat_with_optrack_health() -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    compose = yaml.safe_load((root / "docker-compose.yml").read_text())
    services = compose["services"]
    for name in ("worker", "beat"):
        assert services[name]["healthcheck"]["test"][:3] == ["CMD", "optrack", "health"]
        assert services[name]["restart"] == "unless-stopped"
    assert "beat-data" in compose["volumes"]
    assert services["worker"]["environment"]["OPTRACK_METRICS_PORT"].startswith("${")
    assert services["worker"]["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    for name in ("redis", "postgres", "worker"):
        assert "ports" not in services[name]
