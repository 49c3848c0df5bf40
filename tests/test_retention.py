"""Retention on SQLite and PostgreSQL: old history goes in batches, final states stay."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tests.conftest import SID, TOKEN
from worker.celery_app import PRUNE_TASK, celery_config
from worker.clock import FakeClock
from worker.db import HistoryEntry, Notice, TrackedOperation
from worker.notices import record_end
from worker.repository import Repository
from worker.retention import prune
from worker.settings import load_settings

DAY = timedelta(days=1)


def op_id(n: int) -> str:
    return f"comms_operation_01h9krwprkeee8fzqspvwy6n{n:02d}"


def make_operation(
    sessions: sessionmaker[Session],
    n: int,
    status: str,
    steps: int,
    ended_at: datetime | None,
    first_seen: datetime,
) -> str:
    """An operation with ``steps`` history rows an hour apart, ended at ``ended_at``."""
    with sessions.begin() as session:
        Repository(session).add([op_id(n)], first_seen)
        row = session.get(TrackedOperation, op_id(n))
        assert row is not None
        for seq in range(1, steps + 1):
            observed = first_seen + timedelta(hours=seq)
            session.add(
                HistoryEntry(
                    operation_id=row.id,
                    seq=seq,
                    observed_at=observed,
                    remote_updated_at=observed,
                    status="PROCESSING" if seq < steps or status != "COMPLETED" else status,
                    total=steps,
                    queued=steps - seq,
                    created=seq,
                    failed=0,
                )
            )
        row.status, row.version = status, steps
        row.total, row.queued, row.created, row.failed = steps, 0, steps, 0
        row.ended_at = ended_at
        if ended_at is not None:
            record_end(session, row, ended_at)
    return row.id


def seqs(sessions: sessionmaker[Session]) -> dict[str, list[int]]:
    with sessions() as session:
        found: dict[str, list[int]] = {}
        for entry in session.scalars(select(HistoryEntry).order_by(HistoryEntry.seq)):
            found.setdefault(entry.operation_id, []).append(entry.seq)
        return found


def test_prune_keeps_final_states_and_recent_history(
    sessions: sessionmaker[Session], clock: FakeClock
) -> None:
    now = clock.now()
    long_ago = now - 120 * DAY
    old = [make_operation(sessions, n, "COMPLETED", 5, now - 100 * DAY, long_ago) for n in (1, 2)]
    canceled = make_operation(sessions, 3, "CANCELED", 5, now - 91 * DAY, long_ago)
    recent = make_operation(sessions, 4, "COMPLETED", 3, now - 10 * DAY, now - 11 * DAY)
    active = make_operation(sessions, 5, "PROCESSING", 4, None, long_ago)
    gone = make_operation(sessions, 6, "NOT_FOUND", 0, now - 100 * DAY, long_ago)
    with sessions.begin() as session:  # notices: delivered for old ones but one
        for notice in session.scalars(select(Notice)):
            if notice.operation_id != canceled:
                notice.delivered_at = notice.created_at

    result = prune(sessions, now - 90 * DAY, batch_size=5)

    assert result.history_rows == 12  # 4 + 4 + 4 steps before each final one
    assert result.batches == 3 + 1  # 5 + 5 + 2 history rows, then 3 notices
    assert result.notices == 3  # delivered notices of ended-before-cutoff operations
    history = seqs(sessions)
    assert history == {
        old[0]: [5],
        old[1]: [5],
        canceled: [5],
        recent: [1, 2, 3],
        active: [1, 2, 3, 4],
    }
    with sessions() as session:
        rows = {r.id: r for r in session.scalars(select(TrackedOperation))}
        assert set(rows) == {*old, canceled, recent, active, gone}  # every final state stays
        assert rows[old[0]].status == "COMPLETED" and rows[old[0]].created == 5
        kept = {n.operation_id for n in session.scalars(select(Notice))}
        assert kept == {canceled, recent}  # undelivered, and too recent

    again = prune(sessions, now - 90 * DAY, batch_size=5)
    assert (again.history_rows, again.notices, again.batches) == (0, 0, 0)


def test_beat_entry_is_opt_in() -> None:
    base = {"OPTRACK_DATABASE_URL": "sqlite:///x.sqlite", "OPTRACK_BROKER_URL": "redis://r"}
    assert "optrack-prune" not in celery_config(load_settings(base))["beat_schedule"]
    settings = load_settings({**base, "OPTRACK_PRUNE_OLDER_THAN": "90d"})
    assert settings.prune_older_than == 90 * DAY
    entry = celery_config(settings)["beat_schedule"]["optrack-prune"]
    assert entry["task"] == PRUNE_TASK and entry["schedule"] == 86400.0


@pytest.mark.slow
def test_cli_prune(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> None:
    now = datetime.now(UTC)
    make_operation(sessions, 1, "COMPLETED", 4, now - 100 * DAY, now - 101 * DAY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=db_url,
        TWILIO_ACCOUNT_SID=SID,
        TWILIO_AUTH_TOKEN=TOKEN,
    )
    run = [sys.executable, "-m", "worker", "db", "prune"]
    bad = subprocess.run([*run, "--older-than", "soon"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    done = subprocess.run(
        [*run, "--older-than", "90d"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pruned 3 history row(s) and 0 delivered notice(s)")
    assert seqs(sessions) == {op_id(1): [4]}


@pytest.mark.slow
def test_the_daily_beat_task_prunes(sqlite_url: str, tmp_path: Path) -> None:
    from worker.db import make_engine, make_sessionmaker

    engine = make_engine(sqlite_url)
    sessions = make_sessionmaker(engine)
    now = datetime.now(UTC)
    make_operation(sessions, 1, "COMPLETED", 6, now - 100 * DAY, now - 101 * DAY)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPTRACK_", "TWILIO_"))}
    env.update(
        OPTRACK_HOME=str(tmp_path / "home"),
        OPTRACK_DATABASE_URL=sqlite_url,
        OPTRACK_PRUNE_OLDER_THAN="90d",
    )
    script = (
        "from worker.celery_app import app\n"
        "app.loader.import_default_modules()\n"
        f"print(app.tasks[{PRUNE_TASK!r}].apply().result)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "'history_rows': 5" in done.stdout
    assert seqs(sessions) == {op_id(1): [6]}
    engine.dispose()
