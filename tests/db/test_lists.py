"""Lists of any length: more operations than PostgreSQL binds parameters (65,535) in a statement.

70,000 PROCESSING operations are bulk-loaded (COPY on PostgreSQL, executemany on SQLite, as in
bench/reports.py), then the commands a user runs read them all: `watch --once`, `status
--json`, `report --json`, and a tick places and claims them. Each would fail with one IN list
("number of parameters must be between 0 and 65535").
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from bench.reports import Dataset, load_postgres, load_sqlite
from tests.support.processes import base_env
from worker import sweep
from worker.db import PollGroup, TrackedOperation, make_engine, make_sessionmaker
from worker.repository import GroupClaim, Repository
from worker.tracking import PollPolicy

pytestmark = pytest.mark.slow
COUNT = 70_000  # over 65,535, the most parameters psycopg binds in one statement


def op_id(i: int) -> str:
    return f"comms_operation_0lists{i:020d}"


def dataset(now: datetime) -> Dataset:
    """COUNT operations PROCESSING, created one second apart, one history row each."""
    operations: list[tuple[Any, ...]] = []
    history: list[tuple[Any, ...]] = []
    start = now - timedelta(seconds=COUNT + 60)
    for i in range(COUNT):
        created = start + timedelta(seconds=i)
        seen = created + timedelta(seconds=30)
        # The columns of bench.reports.OP_COLUMNS, in order.
        state = ("PROCESSING", 10, 6, 4, 0, created, seen, created, seen, 1, 0, None, None, 2)
        operations.append((op_id(i), *state))
        history.append((op_id(i), 2, seen, seen, "PROCESSING", 10, 6, 4, 0))
    return Dataset(operations, history, op_id(0), op_id(1), [op_id(0)])


def optrack(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.timeout(900)
def test_more_operations_than_a_statement_binds_parameters(db_url: str, tmp_path: Path) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    engine = make_engine(db_url)
    data = dataset(now)
    (load_postgres if engine.dialect.name == "postgresql" else load_sqlite)(engine, data)
    env = base_env(tmp_path, OPTRACK_DATABASE_URL=db_url)

    watched = optrack(env, "watch", "--once")
    assert watched.returncode == 0, watched.stderr[-2000:]
    assert f"+{COUNT - 50} more" in watched.stdout
    assert f"{COUNT - 50} active" in watched.stdout
    assert "all " not in watched.stdout  # one frame, not a wait for the end

    status = optrack(env, "status", "--json")
    assert status.returncode == 0, status.stderr[-2000:]
    payload = json.loads(status.stdout)
    assert len(payload["operations"]) == COUNT
    assert [o["id"] for o in payload["operations"][:2]] == [op_id(0), op_id(1)]  # oldest first
    assert payload["operations"][-1]["id"] == op_id(COUNT - 1)
    assert payload["dead_letters"] == 0

    report = optrack(env, "report", "--json")
    assert report.returncode == 0, report.stderr[-2000:]
    summary = json.loads(report.stdout)
    assert summary["operations"]["total"] == COUNT

    # A tick: every operation is placed into a group, the due groups are claimed, and given
    # back at once as if the broker had refused them.
    sessions = make_sessionmaker(engine)
    claims: list[GroupClaim] = []
    result = sweep.sweep(
        sessions, now, PollPolicy(), limit=20_000, paused_until=None, send=claims.append
    )
    assert result.placed == COUNT and result.claimed == len(claims) > 0
    with sessions() as session:
        unplaced = select(func.count()).where(TrackedOperation.group_id.is_(None))
        assert session.scalar(unplaced) == 0
    with sessions.begin() as session:
        Repository(session).release(claims, now)
    with sessions() as session:
        claimed = select(func.count()).where(PollGroup.claim_token.is_not(None))
        assert session.scalar(claimed) == 0
    engine.dispose()
