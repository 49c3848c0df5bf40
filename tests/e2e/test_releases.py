"""Rolling upgrades, made safe by refusing: a release will not start, nor migrate, while a
process of another release still beats on the same database; it says which and what to do.

Real processes on a real database: `optrack db upgrade`, `optrack run`, a Celery worker and
beat. The older release is seen as 0.1.0 leaves it: a fresh ``beat`` heartbeat written by its
tick, with no schema revision.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text

from tests.support.processes import (
    CELERY,
    base_env,
    beat_args,
    celery_process,
    wait_for,
    worker_args,
)
from worker.db import SCHEMA_REVISION, Heartbeat, make_engine, make_sessionmaker
from worker.migrate import current_revision, upgrade

pytestmark = pytest.mark.slow

OLD = "0003_reports"  # release 0.1.0's schema


def old_beat(url: str, age: float) -> None:
    """What 0.1.0's tick writes every tick: the ``beat`` row, no revision."""
    engine = make_engine(url)
    beat_at = datetime.now(UTC) - timedelta(seconds=age)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM heartbeats WHERE name = 'beat'"))
        conn.execute(
            text("INSERT INTO heartbeats (name, beat_at) VALUES ('beat', :at)"),
            {"at": beat_at if engine.dialect.name != "sqlite" else beat_at.replace(tzinfo=None)},
        )
    engine.dispose()


def heartbeats(url: str) -> dict[str, str | None]:
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session:
        rows = {hb.name: hb.schema_revision for hb in session.scalars(select(Heartbeat))}
    engine.dispose()
    return rows


def run(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def assert_refused(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    said = result.stderr
    assert "another release of optrack still runs on this database" in said
    assert "beat (schema before 0009, last seen" in said
    assert "Stop every worker and beat of the other release" in said
    assert "Traceback" not in said


def test_the_embedded_default_refuses_to_start_or_migrate_beside_an_older_release(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'optrack.sqlite'}"
    upgrade(url, OLD)
    old_beat(url, age=2)
    env = base_env(
        tmp_path, OPTRACK_DATABASE_URL=url, OPTRACK_BROKER_URL=f"sqla+sqlite:///{tmp_path}/b.db"
    )
    assert_refused(run(env, sys.executable, "-m", "worker", "run"))
    assert_refused(run(env, sys.executable, "-m", "worker", "db", "upgrade"))
    # Nothing changed: no migration, no backup.
    assert current_revision(url) == OLD
    assert list(tmp_path.glob("*.bak")) == []


def test_a_worker_and_beat_refuse_beside_an_older_release_then_start_once_it_is_gone(
    tmp_path: Path, db_url: str
) -> None:
    env = base_env(
        tmp_path,
        OPTRACK_DATABASE_URL=db_url,
        OPTRACK_BROKER_URL=f"sqla+sqlite:///{tmp_path}/broker.sqlite",
    )
    old_beat(db_url, age=2)
    assert_refused(run(env, *CELERY, *worker_args("new")))
    assert_refused(run(env, *CELERY, *beat_args(tmp_path / "schedule")))
    assert_refused(run(env, sys.executable, "-m", "worker", "db", "downgrade", "-1"))

    # The old release stopped: its last beat ages out, and this release starts and beats.
    old_beat(db_url, age=31)
    log = tmp_path / "worker.log"
    with celery_process(worker_args("new"), env, log) as worker:
        wait_for(lambda: "ready." in log.read_text(), 60, "the new worker to be ready")
        wait_for(
            lambda: SCHEMA_REVISION in heartbeats(db_url).values(),
            60,
            "the new worker's heartbeat",
        )
        assert worker.poll() is None
        names = [n for n, rev in heartbeats(db_url).items() if rev == SCHEMA_REVISION]
        assert len(names) == 1 and names[0].startswith("worker:")
    # Stopped cleanly, it forgets its heartbeat: the next release need not wait for it.
    assert names[0] not in heartbeats(db_url)
